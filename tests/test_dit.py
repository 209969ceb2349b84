"""Unit behaviour of the DiT beyond the fixtures: the 15B layout on the meta device, GQA,
expert dispatch independent of token order, and the rotary table edge cases."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.config import DiTConfig, full_config, preview_config
from engine.dit import DiTModel, FourierRope, attention, init_seeded, modality_spans
from engine.packing import pack

SPEC = Path(__file__).resolve().parents[2] / "shared" / "spec"


def test_full_model_on_meta_matches_released_state_dict():
    with torch.device("meta"):
        model = DiTModel(full_config())
    state = model.state_dict()
    rows = [line.rstrip("\n").split("\t") for line in (SPEC / "DIT_STATE_DICT.tsv").read_text().splitlines()[1:]]
    assert len(rows) == len(state) == 331
    for name, shape, dtype in rows:
        assert list(state[name].shape) == eval(shape), name
        assert str(state[name].dtype) == f"torch.{dtype}", name
    assert sum(p.numel() for p in model.parameters()) == 15_299_419_136
    assert all(p.device.type == "meta" for p in model.parameters())


def test_gqa_matches_repeated_kv():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(10, 8, 16, generator=gen)
    k = torch.randn(10, 2, 16, generator=gen)
    v = torch.randn(10, 2, 16, generator=gen)
    got = attention(q, k, v, None, exact=True)
    k_rep, v_rep = k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1)
    ref = F.softmax(torch.einsum("lhd,mhd->hlm", q, k_rep) / 4.0, dim=-1)
    ref = torch.einsum("hlm,mhd->lhd", ref, v_rep)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_expert_dispatch_does_not_depend_on_token_order():
    """Sandwich layers pick the expert by modality; permuting tokens permutes the output."""
    config = DiTConfig(num_layers=3, hidden_size=64, head_dim=16, num_query_groups=2, text_in_channels=32,
                       mm_layers=(0, 2), gelu7_layers=(0,))
    model = DiTModel(config)
    init_seeded(model, 1)
    gen = torch.Generator().manual_seed(2)
    packed = pack(torch.randn(1, 48, 2, 4, 4, generator=gen), torch.randn(1, 5, 64, generator=gen),
                  torch.randn(1, 6, 32, generator=gen), in_channels=config.in_channels)
    with torch.no_grad():
        ref = model(packed.x, packed.coords, packed.modality, compute_dtype=torch.float32)
        perm = torch.randperm(packed.length, generator=gen)
        out = model(packed.x[perm], packed.coords[perm], packed.modality[perm], compute_dtype=torch.float32)
    assert len(modality_spans(packed.modality[perm])) > 3
    torch.testing.assert_close(out, ref[perm], rtol=1e-5, atol=1e-5)


def test_rope_text_rows_identity_in_v2_and_rejects_bad_coords():
    rope = FourierRope(128)
    coords = torch.tensor([[-3.0, 0, 0, 3, 1, 1, 1, 1, 1]])
    table = rope(coords)
    assert torch.equal(table[:, :48], torch.zeros(1, 48)) and torch.equal(table[:, 48:], torch.ones(1, 48))
    with pytest.raises(ValueError, match="non-finite"):
        rope(torch.tensor([[0.0, 0, 0, 1, 1, 1, 2, 1, 1]]))


def test_preview_forward_shapes_and_bf16_close_to_fp32():
    config = preview_config()
    model = DiTModel(config)
    init_seeded(model, 0)
    gen = torch.Generator().manual_seed(3)
    packed = pack(torch.randn(1, 48, 3, 8, 14, generator=gen), torch.randn(1, 9, 64, generator=gen),
                  torch.randn(1, 20, config.text_in_channels, generator=gen), in_channels=config.in_channels)
    with torch.no_grad():
        out32 = model(packed.x, packed.coords, packed.modality, compute_dtype=torch.float32)
        out16 = model(packed.x, packed.coords, packed.modality, compute_dtype=torch.bfloat16)
    assert out32.shape == (3 * 4 * 7 + 9 + 20, 192) and out32.dtype == torch.float32
    assert torch.count_nonzero(out32[-20:]) == 0  # text rows are zero
    assert torch.count_nonzero(out32[84:93, 64:]) == 0  # audio rows use 64 columns
    rel = (out16 - out32).norm() / out32.norm()
    assert 1e-4 < rel < 3e-2  # bf16 differs, but only by rounding


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="num_query_groups"):
        DiTConfig(hidden_size=256, head_dim=32, num_query_groups=3).validate()
    with pytest.raises(ValueError, match="post_norm_layers"):
        DiTConfig.from_dict({"post_norm_layers": [1]})
