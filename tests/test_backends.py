"""Execution backends of the DiT (engine.backends) on CPU.

What these catch: an attention kernel that drops GQA or the local mask, a FlashAttention wrapper with
the wrong layout or a missing fallback, FP8 scaling math that is wrong (too large an error) or not
applied at all (zero error), a ``torch._scaled_mm`` call with the wrong operand layout, a backend that
cannot be undone, graph breaks under ``torch.compile``, and a TensorRT backend that fails late or
unclearly without the package. The GPU kernels themselves (FlashAttention, FP8 on Hopper, Inductor's
Triton code, TensorRT) are not exercised here.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from engine.backends import BACKEND_NAMES, BackendUnavailableError, apply_backend, reset_backend
from engine.backends.attention import (
    flash_kernel,
    math_attention_kernel,
    sdpa_kernel,
    select_attention_kernel,
)
from engine.backends.fp8 import (
    E4M3_MAX,
    Fp8ExpertLinear,
    Fp8Weight,
    dequantize_rowwise,
    fp8_gemm,
    fp8_linear_reference,
    quantize_rowwise,
    scaled_mm_available,
)
from engine.config import DiTConfig, preview_config
from engine.dit import DiTModel, ExpertLinear, attention, init_seeded
from engine.packing import local_attention_ranges, pack
from engine.runner import DiTRunner, DiTStep


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _qkv(length=40, hq=8, hkv=2, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(length, hq, dim, generator=gen), torch.randn(length, hkv, dim, generator=gen),
            torch.randn(length, hkv, dim, generator=gen))


def _local_mask(length=40):
    # 3 latent frames of 8 video tokens, receptive field 1 frame, then 16 audio+text tokens (DIT.md §5.3)
    return local_attention_ranges(24, length, 3, frame_receptive_field=1).mask(length, torch.device("cpu"))


@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_and_math_kernels_match_default_attention_with_gqa(masked):
    q, k, v = _qkv()
    mask = _local_mask() if masked else None
    ref = attention(q, k, v, mask, exact=True)  # the eager path's attention, fp32
    torch.testing.assert_close(sdpa_kernel(q, k, v, mask), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sdpa_kernel(q, k, v, mask, repeat_kv=True), ref, rtol=1e-5, atol=1e-5)  # CUDA+mask path
    torch.testing.assert_close(math_attention_kernel(upcast=True)(q, k, v, mask), ref, rtol=1e-5, atol=1e-5)
    # bf16 inputs: SDPA runs in bf16 (no upcast) -> bf16 rounding only
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    ref_b = attention(qb, kb, vb, mask, exact=True)
    out_b = sdpa_kernel(qb, kb, vb, mask)
    assert out_b.dtype == torch.bfloat16 and _rel(out_b, ref_b) < 1e-2
    if masked:  # the mask is really applied: video frame 0 must not see frame 2
        assert _rel(attention(q, k, v, None, exact=True), ref) > 1e-2


def test_flash_wrapper_layout_gqa_and_fallbacks():
    """A stand-in ``flash_attn_func`` on (batch, seq, heads, dim) with native GQA checks the wrapper."""
    calls = []

    def fake_flash(q, k, v, causal=False):
        calls.append(q.shape)
        assert q.dim() == 4 and q.shape[0] == 1 and not causal
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float(), enable_gqa=True)
        return out.transpose(1, 2).to(q.dtype), None  # FA3 style (out, lse)

    kernel = flash_kernel(fake_flash, devices=("cpu",))
    q, k, v = (t.bfloat16() for t in _qkv())
    out = kernel(q, k, v, None)
    assert calls == [(1, 40, 8, 16)] and out.shape == (40, 8, 16)
    assert _rel(out, attention(q, k, v, None, exact=True)) < 1e-2
    mask = _local_mask()
    torch.testing.assert_close(kernel(q, k, v, mask), sdpa_kernel(q, k, v, mask))  # mask -> SDPA
    kernel(q.float(), k.float(), v.float(), None)  # fp32 -> SDPA
    assert len(calls) == 1


def test_select_attention_kernel_on_cpu():
    name, kernel = select_attention_kernel("cpu")
    assert name == "sdpa" and kernel is sdpa_kernel
    with pytest.raises(ValueError, match="unknown attention kernel"):
        select_attention_kernel("cpu", prefer="xformers")
    with pytest.raises(ValueError, match="not available"):
        select_attention_kernel("cpu", prefer="flash_attn_2")


class _Runners:
    """One DiT behind two runners (fp32 and bf16 compute): backends are applied to both, ``run(dtype)``
    calls the runner step of that dtype, as the engine does."""

    def __init__(self, model: DiTModel, packed):
        self.model, self.packed = model, packed
        self.by_dtype = {dtype: DiTRunner(model, compute_dtype=dtype) for dtype in (torch.float32, torch.bfloat16)}

    def apply(self, name, device="cpu", **options):
        infos = [apply_backend(runner, name, device, **options) for runner in self.by_dtype.values()]
        return infos[-1]

    def reset(self):
        for runner in self.by_dtype.values():
            reset_backend(runner)

    @property
    def step(self):
        return self.by_dtype[torch.float32].forward

    def run(self, dtype=torch.float32):
        with torch.no_grad():
            return self.by_dtype[dtype].forward(self.packed)


def _model_and_inputs(config: DiTConfig, seed=0, frames=3):
    model = DiTModel(config)
    init_seeded(model, seed)
    model.eval()
    gen = torch.Generator().manual_seed(seed + 1)
    packed = pack(torch.randn(1, 48, frames, 4, 6, generator=gen), torch.randn(1, 9, 64, generator=gen),
                  torch.randn(1, 7, config.text_in_channels, generator=gen), in_channels=config.in_channels,
                  frame_receptive_field=1)
    runners = _Runners(model, packed)
    return runners, runners.run


SMALL = DiTConfig(num_layers=3, hidden_size=64, head_dim=16, num_query_groups=2, text_in_channels=32,
                  mm_layers=(0, 2), gelu7_layers=(0,), local_attn_layers=(1,))


def test_fast_backend_with_local_attention_layer_matches_eager():
    runners, run = _model_and_inputs(SMALL)
    ref32, ref16 = run(torch.float32), run(torch.bfloat16)
    info = runners.apply("fast")
    assert info.attention == "sdpa" and runners.step.attention_kernel is not None
    torch.testing.assert_close(run(torch.float32), ref32, rtol=1e-5, atol=1e-5)
    assert _rel(run(torch.bfloat16), ref16) < 2e-2


def test_eager_undoes_every_backend_bit_identically():
    runners, run = _model_and_inputs(SMALL)
    model = runners.model
    keys = set(model.state_dict())
    ref32, ref16 = run(torch.float32), run(torch.bfloat16)
    for name in ("fast", "fp8", "fp8+compile"):
        runners.apply(name, compile_backend="eager")
        assert not torch.equal(run(torch.bfloat16), ref16) or name == "fast"
        assert set(model.state_dict()) == keys  # quantised weights stay out of the state dict
        info = runners.apply("eager")
        assert info.attention == "default" and runners.step.attention_kernel is None
        assert torch.equal(run(torch.float32), ref32) and torch.equal(run(torch.bfloat16), ref16)


def test_compile_captures_each_layer_without_graph_breaks():
    """Dynamo traces every layer as one graph (fullgraph), with the local mask and with FP8; codegen is
    skipped (``eager`` compiler backend) to stay fast on CPU."""
    runners, run = _model_and_inputs(SMALL)
    ref = run(torch.bfloat16)
    torch._dynamo.reset()
    info = runners.apply("compile", compile_backend="eager", compile_fullgraph=True)
    assert info.compile_mode == "default" and info.modules_changed == SMALL.num_layers
    assert _rel(run(torch.bfloat16), ref) < 2e-2
    runners.apply("fp8+compile", compile_backend="eager", compile_fullgraph=True)
    assert 1e-3 < _rel(run(torch.bfloat16), ref) < 0.2
    runners.reset()
    assert torch.equal(run(torch.bfloat16), ref)


def _module_snapshot(model: torch.nn.Module) -> dict:
    """Every submodule's class and the identity of everything in its ``__dict__`` (children, parameters,
    buffers, hook dicts and their entries, a compiled call, a ``forward`` override): what a backend
    that changes the module would change."""
    snap = {}
    for name, module in model.named_modules():
        attrs = {}
        for key, value in vars(module).items():
            entries = {k: id(v) for k, v in value.items()} if isinstance(value, dict) else None
            attrs[key] = (id(value), entries)
        snap[name] = (type(module), attrs)
    return snap


@pytest.mark.parametrize("name", ["fast", "fp8", "compile", "fp8+compile"])
def test_backend_changes_the_runner_step_not_the_dit(name):
    """Applied through the runner, a backend leaves the DiTModel instance as it was (same classes, no
    attribute added or replaced, no compiled call, no forward override, the same weight tensors with
    the same values), the DiT called directly is still the eager path bit for bit, and the runner's
    step gives the backend's output (within the tolerances of the tests above)."""
    runners, run = _model_and_inputs(SMALL)
    model = runners.model
    ref32, ref16 = run(torch.float32), run(torch.bfloat16)
    before = _module_snapshot(model)
    weights = {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}
    torch._dynamo.reset()
    info = runners.apply(name, compile_backend="eager", fp8_impl="emulate")
    out32, out16 = run(torch.float32), run(torch.bfloat16)

    assert _module_snapshot(model) == before
    assert "forward" not in vars(model) and not any(isinstance(m, Fp8ExpertLinear) for m in model.modules())
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in model.modules())
    state = model.state_dict()
    assert set(state) == set(weights)
    assert all(state[k].data_ptr() == ptr and torch.equal(state[k], value) for k, (ptr, value) in weights.items())
    for dtype, ref in ((torch.float32, ref32), (torch.bfloat16, ref16)):
        assert torch.equal(runners.by_dtype[dtype].dit_forward(runners.packed), ref)  # the DiT is still eager

    step = runners.step
    assert isinstance(step, DiTStep) and step.attention_kernel is sdpa_kernel and info.attention == "sdpa"
    shadow = step.model
    if name == "fast":
        assert shadow is model
    else:  # fp8 / layer compile run the backend's own copy of the module tree, on the DiT's tensors
        own = dict(model.named_parameters())
        assert shadow is not model and all(p is own[k] for k, p in shadow.named_parameters())
    if "fp8" in name:
        linears = [m for m in shadow.modules() if isinstance(m, Fp8ExpertLinear)]
        assert len(linears) == info.modules_changed - (SMALL.num_layers if "compile" in name else 0) == 4 * SMALL.num_layers
        assert not any(isinstance(m, ExpertLinear) for m in shadow.modules())
        assert 1e-3 < _rel(out16, ref16) < 0.2
    else:
        torch.testing.assert_close(out32, ref32, rtol=1e-5, atol=1e-5)
        assert _rel(out16, ref16) < 2e-2
    if "compile" in name:
        assert all(layer._compiled_call_impl is not None for layer in shadow.block.layers)


def test_compile_scope_model_compiles_the_step_and_context_parallel_refuses_it():
    """Scope ``model``: the runner's step itself is ``torch.compile``d (one compiled callable, the DiT
    untouched); a step that does not call a DiT module cannot be split over ranks, and says so."""
    from engine.context_parallel import step_parts

    runners, run = _model_and_inputs(SMALL)
    model = runners.model
    ref = run(torch.float32)
    before = _module_snapshot(model)
    torch._dynamo.reset()
    info = runners.apply("compile", compile_backend="eager", compile_scope="model")
    assert info.compile_scope == "model" and info.modules_changed == 1
    assert not isinstance(runners.step, DiTStep)
    torch.testing.assert_close(run(torch.float32), ref, rtol=1e-5, atol=1e-5)
    assert _module_snapshot(model) == before
    with pytest.raises(ValueError, match="backend 'compile' \\(compile scope 'model'\\)"):
        step_parts(runners.by_dtype[torch.float32])
    runners.reset()
    assert step_parts(runners.by_dtype[torch.float32]) == (model, None)


def test_rowwise_quantisation_error_bound():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=gen) * torch.logspace(-3, 3, 64)[:, None]  # rows of very different scale
    x[5] = 0.0
    q, scale = quantize_rowwise(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    deq = dequantize_rowwise(q, scale)
    # e4m3 has 3 mantissa bits: relative rounding <= 2^-4 for normals, absolute <= 2^-10 * scale for subnormals
    assert torch.all((deq - x).abs() <= x.abs() / 16 + scale * 2.0**-10 + 1e-30)
    assert torch.equal(deq[5], torch.zeros(96))
    row_max = q.float().abs().amax(dim=1)
    assert torch.equal(row_max[row_max > 0], torch.full_like(row_max[row_max > 0], E4M3_MAX))


def test_fp8_gemm_emulation_error_small_but_nonzero():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50, 200, generator=gen)
    w = torch.randn(40, 200, generator=gen) / 200**0.5  # N = 40, K = 200: both padded to multiples of 16
    ref = x @ w.t()
    weight = Fp8Weight.from_weight(w.bfloat16())
    assert weight.q.shape == (48, 208) and weight.scale.shape == (1, 48)
    out = fp8_gemm(x, weight, "emulate")
    assert out.shape == (50, 40) and out.dtype == torch.bfloat16
    err = _rel(out, ref)
    assert 0.01 < err < 0.06  # ~3.7 % for Gaussian data: e4m3 rounding of both operands
    assert _rel(out, fp8_linear_reference(x, w.bfloat16())) < 1e-3
    assert _rel(x.bfloat16() @ w.bfloat16().t(), ref) < 0.01  # bf16 is far more precise


@pytest.mark.skipif(not scaled_mm_available("cpu"), reason="this PyTorch has no CPU torch._scaled_mm")
def test_scaled_mm_call_matches_emulation():
    """The exact ``torch._scaled_mm`` call used on Hopper (row-major A, column-major B, [M,1]/[1,N]
    fp32 scales, bf16 out), run by PyTorch's CPU implementation, equals the emulation."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(37, 200, generator=gen).bfloat16()
    weight = Fp8Weight.from_weight(torch.randn(40, 200, generator=gen) / 200**0.5)
    assert _rel(fp8_gemm(x, weight, "scaled_mm"), fp8_gemm(x, weight, "emulate")) < 1e-3


def test_fp8_backend_velocity_error_on_preview_model():
    """Velocity of the seeded preview DiT, FP8 (emulated) vs bf16: measured 0.08 relative L2."""
    config = preview_config()
    model = DiTModel(config)
    init_seeded(model, 0)
    model.eval()
    gen = torch.Generator().manual_seed(3)
    packed = pack(torch.randn(1, 48, 4, 8, 14, generator=gen), torch.randn(1, 13, 64, generator=gen),
                  torch.randn(1, 24, config.text_in_channels, generator=gen), in_channels=config.in_channels)

    runner = DiTRunner(model, compute_dtype=torch.bfloat16)

    def run():
        with torch.no_grad():
            return runner.forward(packed)

    ref = run()
    info = apply_backend(runner, "fp8", "cpu")
    assert info.fp8 == "emulate" and info.modules_changed == 4 * config.num_layers
    err = _rel(run(), ref)
    assert 1e-3 < err < 0.15


def test_tensorrt_missing_fails_at_once_with_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, even where installed
    from engine.backends.tensorrt_backend import TensorRTDiT, build_engine, require_tensorrt

    model = DiTModel(SMALL)
    runner = DiTRunner(model)
    eager = runner.forward
    for call in (lambda: apply_backend(runner, "tensorrt", "cpu"),  # no onnx_path given: still the package error
                 require_tensorrt,
                 lambda: build_engine("missing.onnx", "missing.plan"),
                 lambda: TensorRTDiT("missing.plan")):
        with pytest.raises(BackendUnavailableError, match=r"`tensorrt`.*pip install tensorrt-cu12"):
            call()
    assert runner.forward is eager and runner.forward.attention_kernel is None and "forward" not in model.__dict__


def test_backend_names_are_validated():
    model = DiTModel(SMALL)
    runner = DiTRunner(model)
    assert BACKEND_NAMES == ("eager", "fast", "compile", "fp8", "tensorrt")
    for bad in ("turbo", "", "eager+fp8", "tensorrt+compile"):
        with pytest.raises(ValueError):
            apply_backend(runner, bad, "cpu")
    with pytest.raises(ValueError, match="fp8_impl"):
        apply_backend(runner, "fp8", "cpu", fp8_impl="int8")
    with pytest.raises(ValueError, match="compile scope"):
        apply_backend(runner, "compile", "cpu", compile_scope="block")
    with pytest.raises(TypeError, match="DiTRunner"):
        apply_backend(model, "fast", "cpu")  # the DiT itself is no backend target any more


def _fake_tensorrt(parse_ok: bool):
    """A stand-in ``tensorrt`` module recording the builder calls (the real one needs a GPU)."""
    calls = []

    class Logger:
        WARNING = 2

        def __init__(self, level):
            calls.append(("logger", level))

    class Parser:
        num_errors = 1

        def __init__(self, network, log):
            pass

        def parse_from_file(self, path):
            calls.append(("parse", path))
            return parse_ok

        def get_error(self, i):
            return "unsupported op Foo"

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls.append(("workspace", pool, size))

    class Builder:
        def __init__(self, log):
            pass

        def create_network(self, flags):
            calls.append(("network", flags))
            return object()

        def create_builder_config(self):
            return Config()

        def build_serialized_network(self, network, config):
            return b"plan-bytes"

    module = types.SimpleNamespace(
        Logger=Logger, Builder=Builder, OnnxParser=Parser,
        NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=3),
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="workspace"),
    )
    return module, calls


def test_tensorrt_build_engine_call_sequence_with_stand_in(monkeypatch, tmp_path):
    """Only the Python glue: strongly typed network, parse from file (external data), workspace, plan written."""
    from engine.backends.tensorrt_backend import build_engine

    fake, calls = _fake_tensorrt(parse_ok=True)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    plan = build_engine(tmp_path / "dit.onnx", tmp_path / "dit.plan", workspace_gb=1)
    assert plan.read_bytes() == b"plan-bytes"
    assert ("network", 1 << 3) in calls and ("parse", str(tmp_path / "dit.onnx")) in calls
    assert ("workspace", "workspace", 1 << 30) in calls
    fake_bad, _ = _fake_tensorrt(parse_ok=False)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_bad)
    with pytest.raises(RuntimeError, match="unsupported op Foo"):
        build_engine(tmp_path / "dit.onnx", tmp_path / "other.plan")
