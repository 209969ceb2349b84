#!/usr/bin/env bash
# Issue 17's GPU measurements in ONE device call, most important first (a part cut by the budget
# leaves the earlier parts' files). Run from the repo root, on the device:
#   run(command="bash ops/gpu/issue17.sh", carry=[".whl"], timeout_s=590)
# after `bash ops/gpu/fetch_wheels.sh` here. Everything it writes lands in $OUT (which comes back):
# one ops.bench JSON per part (schema avatar-server-bench/1, ops/results/README.md), its log, and
# env.txt. Copy the JSON into ops/results/ as YYYY-MM-DD_<gpu>-full-<part>.json.
#
# Parts:
#   a  eager, fast, fp8 at 400 and 640 text tokens, each with the loop also run through
#      engine.graphs.GraphLoop (one CUDA graph for the whole 8-step loop): dit_8step_s vs
#      dit_8step_graph_s, decode, first frame, rel_err_vs_eager (FP8 velocity error), and peak
#      memory with the T5Gemma 9B encoder resident beside DiT + Turbo decoder (text_encode_s too)
#   b  compile and fp8+compile, same texts, with and without the CUDA-graph loop
#   c  --profile 15 of fp8+compile at 400 tokens (the top kernels by device time)
#
# Rehearsal on CPU (what ops/gpu/README.md says to run before spending device time):
#   PRESET=preview DEVICE=cpu OUT=/tmp/issue17 BUDGET_S=900 bash ops/gpu/issue17.sh
set -uo pipefail
PRESET=${PRESET:-full}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/issue17}
BUDGET_S=${BUDGET_S:-560}
TEXTS=${TEXTS:-"400 640"}
REPEATS=${REPEATS:-"--warmup 1 --repeats 3 --loop-repeats 2"}
mkdir -p "$OUT"
start=$(date +%s)

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install --quiet --no-index --no-deps --find-links .whl diffusers soxr soundfile \
    > "$OUT/pip.log" 2>&1 || { echo "pip install from .whl failed:"; cat "$OUT/pip.log"; }
  rm -f "$OUT/pip.log"  # at most 8 files come back
fi
python3 - > "$OUT/env.txt" 2>&1 <<'PY'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "memory_gb", round(p.total_memory / 1e9, 1), "sms", p.multi_processor_count)
for name in ("diffusers", "transformers", "safetensors", "soxr", "flash_attn", "flash_attn_interface"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as exc:  # noqa: BLE001 - a report, not a check
        print(name, "missing:", type(exc).__name__, exc)
PY
cat "$OUT/env.txt"

part() {  # part NAME BACKENDS EXTRA...: one ops.bench run within what is left of the budget
  local name=$1 backends=$2; shift 2
  local left=$(( BUDGET_S - ($(date +%s) - start) ))
  if (( left < 60 )); then echo "part $name skipped: ${left} s left"; return; fi
  echo "== part $name ($backends) with ${left} s left"
  # shellcheck disable=SC2086
  timeout "$left" python3 -m ops.bench --preset "$PRESET" --device "$DEVICE" --backend "$backends" \
    --text-tokens $TEXTS $REPEATS "$@" --out "$OUT/bench-$name.json" > "$OUT/bench-$name.log" 2>&1
  echo "part $name: exit $? after $(( $(date +%s) - start )) s"; tail -n 25 "$OUT/bench-$name.log"
}

part a "eager,fast,fp8" --graph-loop --resident-text-encoder
part b "compile,fp8+compile" --graph-loop
part c "fp8+compile" --profile 15 --text-tokens 400
echo "total $(( $(date +%s) - start )) s; files:"; ls -la "$OUT"
