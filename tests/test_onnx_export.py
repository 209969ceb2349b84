"""ONNX export of the fixed-geometry DiT (ops.export_onnx), checked with onnxruntime on CPU.

What this catches: an export that traces the wrong geometry or spans, loses the GQA grouping or the
rotary table, keeps weights inside the protobuf instead of the external-data file (fatal at 15 B
parameters), or an attention rewrite that changes the numerics.

Tolerance: the export computes in fp32 throughout (``--compute-dtype fp32``), so onnxruntime and
PyTorch differ only by fp32 summation order: measured max |Δ| ≈ 4e-6 at an output scale of ≈ 5
(relative 8e-7). The test allows ``max_abs <= 1e-4 * max|ref|``, 100x the measurement, still four
orders below bf16 rounding (~5e-3 relative).
"""

from __future__ import annotations

import onnx
import pytest
import torch

from engine.factory import preset_geometry, seeded_preset_dit
from ops.export_onnx import example_inputs, export_dit_onnx, export_name, verify_onnx


@pytest.fixture(scope="module")
def preview():
    geo = preset_geometry("preview", 0.6)  # 224x128, 16 audio latents, T = 4
    model = seeded_preset_dit("preview", "cpu", seed=0)
    packed = example_inputs(model.config, geo, 24, "cpu", seed=1)
    return geo, model, packed


def test_fp32_export_with_external_data_matches_pytorch(tmp_path, preview):
    geo, model, packed = preview
    path = tmp_path / (export_name("preview", geo.width, geo.height, geo.seconds, 24, "fp32") + ".onnx")
    info = export_dit_onnx(model, packed, path, compute_dtype=torch.float32)
    assert info.seq_len == packed.length == 4 * 4 * 7 + 16 + 24
    # weights live in one external file next to the graph, not in the protobuf
    assert info.data_bytes > 4 * sum(p.numel() for p in model.block.parameters()) * 0.9
    assert info.onnx_bytes < info.data_bytes / 10
    proto = onnx.load(str(path), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {path.name + ".data"}
    assert [i.name for i in proto.graph.input] == ["x", "coords"]
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [packed.length, model.config.in_channels]

    report = verify_onnx(path, model, packed, compute_dtype=torch.float32)
    assert report["max_abs"] <= 1e-4 * report["ref_max_abs"], report
    assert report["max_abs_traced"] <= 1e-4 * report["ref_max_abs"], report
    assert report["ref_max_abs"] > 0.1  # not comparing zeros


def test_bf16_export_is_a_valid_graph_with_bf16_weights(tmp_path, preview):
    """The TensorRT target (bf16 weights and GEMMs): structurally valid; onnxruntime's CPU provider has no
    bf16 MatMul, so its numerics are checked only on a GPU (TensorRT)."""
    _, model, packed = preview
    info = export_dit_onnx(model, packed, tmp_path / "dit_bf16.onnx", compute_dtype=torch.bfloat16)
    proto = onnx.load(info.onnx_path, load_external_data=False)
    types = {t.data_type for t in proto.graph.initializer if "weight" in t.name or t.external_data}
    assert onnx.TensorProto.BFLOAT16 in types
    assert info.compute_dtype == "bfloat16"
