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
    Fp8Weight,
    dequantize_rowwise,
    fp8_gemm,
    fp8_linear_reference,
    quantize_rowwise,
    scaled_mm_available,
)
from engine.config import DiTConfig, preview_config
from engine.dit import DiTModel, attention, init_seeded
from engine.packing import local_attention_ranges, pack


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


def _model_and_inputs(config: DiTConfig, seed=0, frames=3):
    model = DiTModel(config)
    init_seeded(model, seed)
    model.eval()
    gen = torch.Generator().manual_seed(seed + 1)
    packed = pack(torch.randn(1, 48, frames, 4, 6, generator=gen), torch.randn(1, 9, 64, generator=gen),
                  torch.randn(1, 7, config.text_in_channels, generator=gen), in_channels=config.in_channels,
                  frame_receptive_field=1)

    def run(dtype=torch.float32):
        with torch.no_grad():
            return model(packed.x, packed.coords, packed.modality, spans=packed.spans,
                         local_ranges=packed.local_ranges, compute_dtype=dtype)

    return model, run


SMALL = DiTConfig(num_layers=3, hidden_size=64, head_dim=16, num_query_groups=2, text_in_channels=32,
                  mm_layers=(0, 2), gelu7_layers=(0,), local_attn_layers=(1,))


def test_fast_backend_with_local_attention_layer_matches_eager():
    model, run = _model_and_inputs(SMALL)
    ref32, ref16 = run(torch.float32), run(torch.bfloat16)
    info = apply_backend(model, "fast", "cpu")
    assert info.attention == "sdpa" and model.attention_kernel is not None
    torch.testing.assert_close(run(torch.float32), ref32, rtol=1e-5, atol=1e-5)
    assert _rel(run(torch.bfloat16), ref16) < 2e-2


def test_eager_undoes_every_backend_bit_identically():
    model, run = _model_and_inputs(SMALL)
    keys = set(model.state_dict())
    ref32, ref16 = run(torch.float32), run(torch.bfloat16)
    for name in ("fast", "fp8", "fp8+compile"):
        apply_backend(model, name, "cpu", compile_backend="eager")
        assert not torch.equal(run(torch.bfloat16), ref16) or name == "fast"
        assert set(model.state_dict()) == keys  # quantised weights stay out of the state dict
        info = apply_backend(model, "eager", "cpu")
        assert info.attention == "default" and model.attention_kernel is None
        assert torch.equal(run(torch.float32), ref32) and torch.equal(run(torch.bfloat16), ref16)


def test_compile_captures_each_layer_without_graph_breaks():
    """Dynamo traces every layer as one graph (fullgraph), with the local mask and with FP8; codegen is
    skipped (``eager`` compiler backend) to stay fast on CPU."""
    model, run = _model_and_inputs(SMALL)
    ref = run(torch.bfloat16)
    torch._dynamo.reset()
    info = apply_backend(model, "compile", "cpu", compile_backend="eager", compile_fullgraph=True)
    assert info.compile_mode == "default" and info.modules_changed == SMALL.num_layers
    assert _rel(run(torch.bfloat16), ref) < 2e-2
    apply_backend(model, "fp8+compile", "cpu", compile_backend="eager", compile_fullgraph=True)
    assert 1e-3 < _rel(run(torch.bfloat16), ref) < 0.2
    reset_backend(model)
    assert torch.equal(run(torch.bfloat16), ref)


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

    def run():
        with torch.no_grad():
            return model(packed.x, packed.coords, packed.modality, spans=packed.spans, compute_dtype=torch.bfloat16)

    ref = run()
    info = apply_backend(model, "fp8", "cpu")
    assert info.fp8 == "emulate" and info.modules_changed == 4 * config.num_layers
    err = _rel(run(), ref)
    assert 1e-3 < err < 0.15


def test_tensorrt_missing_fails_at_once_with_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, even where installed
    from engine.backends.tensorrt_backend import TensorRTDiT, build_engine, require_tensorrt

    model = DiTModel(SMALL)
    for call in (lambda: apply_backend(model, "tensorrt", "cpu"),  # no onnx_path given: still the package error
                 require_tensorrt,
                 lambda: build_engine("missing.onnx", "missing.plan"),
                 lambda: TensorRTDiT("missing.plan")):
        with pytest.raises(BackendUnavailableError, match=r"`tensorrt`.*pip install tensorrt-cu12"):
            call()
    assert model.attention_kernel is None and "forward" not in model.__dict__


def test_backend_names_are_validated():
    model = DiTModel(SMALL)
    assert BACKEND_NAMES == ("eager", "fast", "compile", "fp8", "tensorrt")
    for bad in ("turbo", "", "eager+fp8", "tensorrt+compile"):
        with pytest.raises(ValueError):
            apply_backend(model, bad, "cpu")
    with pytest.raises(ValueError, match="fp8_impl"):
        apply_backend(model, "fp8", "cpu", fp8_impl="int8")


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
