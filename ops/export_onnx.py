"""Export the distilled DiT for one fixed segment geometry to ONNX (external weight data) and check it.

The exported module is :class:`FixedGeometryDiT`: ``(x [L, in_channels] fp32, coords [L, 9] fp32) ->
velocity [L, out_channels] fp32``, with the modality spans of the standard ``[video | audio | text]``
packing baked in (PIPELINE.md §8.4), so one file serves exactly one ``(width, height, seconds,
text tokens)``. The TensorRT backend (:mod:`engine.backends.tensorrt_backend`) builds its engine from
such a file.

* Exporter: PyTorch's TorchScript-based ONNX exporter (``dynamo=False``), opset 18; the
  ``dynamo=True`` exporter needs ``onnxscript``, which is not a dependency. Attention is traced
  through :func:`engine.backends.attention.math_attention_kernel` (MatMul-Softmax-MatMul with GQA by
  grouping), because SDPA with ``enable_gqa`` has no ONNX conversion.
* ``--compute-dtype fp32`` (the default, and the one verified): every bf16 cast of DIT.md §6 becomes
  fp32 and the bf16-valued weights are stored as fp32, so onnxruntime's CPU provider can run it.
  ``bf16``: the reference numerics (bf16 weights, GEMMs and attention), the target of the TensorRT
  backend; onnxruntime's CPU provider cannot run bf16 MatMul, so it is only structurally checked
  (``onnx.checker``).
* Weights go to one external-data file next to the graph (``save_as_external_data``), required for
  the 15 B model (30.6 GB in bf16; protobuf files are limited to 2 GB).

Usage::

    python -m ops.export_onnx --preset preview --device cpu --seconds 1 --text-tokens 32 --out /tmp/onnx --verify
    python -m ops.export_onnx --preset full --device cuda --text-tokens 400 --compute-dtype bf16 --out /data/onnx
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from engine.backends.attention import math_attention_kernel
from engine.config import DiTConfig
from engine.dit import AttentionKernel, DiTModel, Span
from engine.factory import preset_geometry, seeded_preset_dit
from engine.geometry import SegmentGeometry
from engine.packing import PackedInputs, pack

logger = logging.getLogger(__name__)

__all__ = ["ExportInfo", "FixedGeometryDiT", "example_inputs", "export_dit_onnx", "export_name", "main", "verify_onnx"]

OPSET = 18
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class FixedGeometryDiT(nn.Module):
    """The DiT with its modality spans fixed: ``forward(x, coords) -> velocity`` (shapes as the packing).

    Args:
        model: the DiT.
        spans: modality spans of the packed sequence.
        modality: int64 ``[L]`` modality ids (kept for the DiT's signature; unused once spans are given).
        compute_dtype: block compute dtype (``torch.float32`` or ``torch.bfloat16``).
        attention_kernel: passed to every DiT call (the export passes :func:`traceable_attention`'s
            kernel); None: the DiT's default attention.
    """

    def __init__(self, model: DiTModel, spans: list[Span], modality: torch.Tensor, compute_dtype: torch.dtype,
                 attention_kernel: AttentionKernel | None = None):
        super().__init__()
        self.model, self.spans, self.compute_dtype = model, list(spans), compute_dtype
        self.attention_kernel = attention_kernel
        self.register_buffer("modality", modality.clone(), persistent=False)

    def forward(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """``x`` fp32 ``[L, in_channels]``, ``coords`` fp32 ``[L, 9]`` -> fp32 ``[L, out_channels]``."""
        return self.model(x, coords, self.modality, spans=self.spans, compute_dtype=self.compute_dtype,
                          exact_attention=True, attention_kernel=self.attention_kernel)


def example_inputs(config: DiTConfig, geo: SegmentGeometry, text_tokens: int, device, seed: int = 0) -> PackedInputs:
    """Packed random latents and text features of the segment geometry (PIPELINE.md §8): seeded
    ``randn`` video ``[1, C, T, h, w]``, audio ``[1, A, 64]`` and text ``[1, text_tokens, C_text]``."""
    gen = torch.Generator().manual_seed(seed)
    video = torch.randn(geo.latent_shape(config.latent_channels), generator=gen)
    audio = torch.randn(1, geo.audio_tokens, config.audio_in_channels, generator=gen)
    text = torch.randn(1, text_tokens, config.text_in_channels, generator=gen)
    return pack(video.to(device), audio.to(device), text.to(device), in_channels=config.in_channels)


def traceable_attention(compute_dtype: torch.dtype) -> AttentionKernel:
    """The attention kernel the export traces: :func:`math_attention_kernel`, upcast in fp32 compute."""
    return math_attention_kernel(upcast=compute_dtype == torch.float32)


@dataclass
class ExportInfo:
    """Result of :func:`export_dit_onnx` (sizes in bytes, times in seconds)."""

    onnx_path: str
    data_path: str
    onnx_bytes: int
    data_bytes: int
    export_s: float
    seq_len: int
    compute_dtype: str
    opset: int


def export_name(preset: str, width: int, height: int, seconds: float, text_tokens: int, dtype: str) -> str:
    """File stem of an export: ``dit_{preset}_{W}x{H}_{seconds}s_nt{N}_{dtype}``."""
    return f"dit_{preset}_{width}x{height}_{seconds:g}s_nt{text_tokens}_{dtype}"


@torch.no_grad()
def export_dit_onnx(model: DiTModel, packed: PackedInputs, out_path: str | Path, *,
                    compute_dtype: torch.dtype = torch.float32, opset: int = OPSET) -> ExportInfo:
    """Export ``model`` for the geometry of ``packed`` to ``out_path`` (+ ``out_path.data``).

    Args:
        model: the DiT in eval mode (any device; tracing runs one forward there).
        packed: example inputs; their length and spans fix the geometry.
        out_path: the ``.onnx`` file to write; its weights go to ``<name>.onnx.data`` next to it.
        compute_dtype: ``torch.float32`` (verifiable with onnxruntime on CPU) or ``torch.bfloat16``.
        opset: ONNX opset.
    """
    import onnx

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    module = FixedGeometryDiT(model, packed.spans, packed.modality, compute_dtype,
                              traceable_attention(compute_dtype)).eval()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings of the rotary-table finiteness check (constant here)
        raw = Path(tmp) / "raw.onnx"
        torch.onnx.export(
            module, (packed.x, packed.coords), str(raw), dynamo=False, opset_version=opset,
            input_names=["x", "coords"], output_names=["velocity"], do_constant_folding=True,
        )
        proto = onnx.load(str(raw))  # also loads external data if the exporter wrote any (> 2 GB)
        data_name = out_path.name + ".data"
        (out_path.parent / data_name).unlink(missing_ok=True)
        onnx.save_model(proto, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
    export_s = time.perf_counter() - start
    data_path = out_path.parent / data_name
    onnx.checker.check_model(str(out_path))  # path form: large models with external data
    return ExportInfo(str(out_path), str(data_path), out_path.stat().st_size,
                      data_path.stat().st_size if data_path.exists() else 0, export_s, packed.length,
                      str(compute_dtype).replace("torch.", ""), opset)


@torch.no_grad()
def verify_onnx(onnx_path: str | Path, model: DiTModel, packed: PackedInputs, *,
                compute_dtype: torch.dtype = torch.float32, threads: int | None = None) -> dict:
    """Run the export with onnxruntime (CPU) and compare with PyTorch on the same inputs.

    Returns a dict with ``max_abs`` (ONNX vs the PyTorch model on its default attention), ``ref_max_abs``
    (output scale), ``rel_max = max_abs / ref_max_abs``, ``rel_l2``, ``max_abs_traced`` (ONNX vs PyTorch with
    the traced attention kernel), and the two run times.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    x, coords = packed.x.detach().cpu().float(), packed.coords.detach().cpu().float()
    start = time.perf_counter()
    (got,) = session.run(["velocity"], {"x": x.numpy(), "coords": coords.numpy()})
    ort_s = time.perf_counter() - start
    got = torch.from_numpy(got)
    module = FixedGeometryDiT(model, packed.spans, packed.modality, compute_dtype).eval()
    start = time.perf_counter()
    ref = module(packed.x, packed.coords).float().cpu()
    torch_s = time.perf_counter() - start
    traced_module = FixedGeometryDiT(model, packed.spans, packed.modality, compute_dtype,
                                     traceable_attention(compute_dtype)).eval()
    traced = traced_module(packed.x, packed.coords).float().cpu()
    err = (got - ref).abs()
    return {
        "max_abs": float(err.max()),
        "ref_max_abs": float(ref.abs().max()),
        "rel_max": float(err.max() / ref.abs().max().clamp(min=1e-30)),
        "rel_l2": float((got - ref).norm() / ref.norm().clamp(min=1e-30)),
        "max_abs_traced": float((got - traced).abs().max()),
        "onnxruntime_s": ort_s,
        "torch_s": torch_s,
    }


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ops.export_onnx", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=("preview", "full"), default="preview")
    p.add_argument("--device", default="cpu", help="where to build the model and trace (cuda for full)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: 224 preview, 448 full)")
    p.add_argument("--height", type=int, default=None, help="pixels (default: 128 preview, 256 full)")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--text-tokens", type=int, default=400)
    p.add_argument("--compute-dtype", choices=tuple(_DTYPES), default="fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--verify", action="store_true", help="compare with onnxruntime on CPU (fp32 only)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    geo = preset_geometry(args.preset, args.seconds, args.width, args.height)
    dtype = _DTYPES[args.compute_dtype]
    model = seeded_preset_dit(args.preset, args.device, args.seed)
    packed = example_inputs(model.config, geo, args.text_tokens, args.device, seed=args.seed)
    name = export_name(args.preset, geo.width, geo.height, geo.seconds, args.text_tokens, args.compute_dtype)
    info = export_dit_onnx(model, packed, args.out / f"{name}.onnx", compute_dtype=dtype)
    report = {"export": asdict(info), "geometry": geo.to_dict(), "text_tokens": args.text_tokens}
    if args.verify:
        if dtype != torch.float32:
            raise SystemExit("--verify needs --compute-dtype fp32 (onnxruntime's CPU provider has no bf16 MatMul)")
        report["verify"] = verify_onnx(info.onnx_path, model, packed, compute_dtype=dtype)
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
