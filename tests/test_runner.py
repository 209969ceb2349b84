"""The one denoising path (engine.runner), the one geometry (engine.geometry), the factory, static
text shapes (issue 17) and the bounded prompt cost (issue 18).

What this catches: a runner whose persistent ``x`` buffer leaks one step into the next, a padding
mask that does not reach the attention (bucketed output drifting from the unpadded one), text
lengths that reach the DiT unbucketed (unbounded compile/graph/oneDNN caches), a prompt whose
token count reaches the text encoder or the DiT unbounded, and a geometry that disagrees with the
streaming layer's frame count.

Tolerances: the bucketed fp32 path may differ from the unpadded one only by float summation order
inside the masked softmax; the fixtures' fp32 tolerance (rel_l2 <= 1e-5, README §1.5) is used.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine.api import EngineInputError, SegmentKind, SegmentRequest, segment_frame_count
from engine.config import DiTConfig
from engine.dit import DiTModel
from engine.factory import build_preview_engine, create_engine, preset_geometry
from engine.geometry import SegmentGeometry
from engine.packing import pack, unpack
from engine.runner import DiTRunner, bucket_for, text_buckets_up_to
from engine.testpattern import TestPatternEngine

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "upstream"


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---------------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("seconds", [0.04, 0.4, 1.0, 2.0, 3.3, 5.0, 10.0])
def test_geometry_matches_the_streaming_frame_count(seconds):
    geo = SegmentGeometry.for_seconds(seconds, 448, 256)
    assert geo.frames == segment_frame_count(seconds)
    assert geo.latent_frames == (geo.audio_latents - 1) // 4 + 1


def test_geometry_of_a_5_s_256p_segment():
    geo = preset_geometry("full", 5.0)
    assert (geo.width, geo.height, geo.audio_latents, geo.latent_frames, geo.frames) == (448, 256, 126, 32, 125)
    assert geo.latent_shape() == (1, 48, 32, 16, 28) and geo.video_tokens == 3584
    assert geo.sequence_length(640) == 3584 + 126 + 640 and geo.seconds == 5.0
    assert preset_geometry("preview", 0.4).latent_shape() == (1, 48, 3, 8, 14)


# ---------------------------------------------------------------------------------------- runner


def case_model(case: dict) -> DiTModel:
    """The fixtures' tiny DiT with the case's local-attention layers (as engine.parity builds it)."""
    meta = json.loads((FIXTURES / "dit_tiny_config.json").read_text())
    config = dataclasses.replace(DiTConfig.from_dict(meta["model_config"]),
                                 local_attn_layers=tuple(case.get("local_attn_layers") or ()))
    model = DiTModel(config)
    model.load_state_dict(load_file(FIXTURES / "dit_tiny_weights.safetensors"))
    return model.eval()


@pytest.fixture(scope="module")
def fixture_model():
    meta = json.loads((FIXTURES / "dit_tiny_config.json").read_text())
    cases = {c["name"]: c for c in meta["cases"]}
    return case_model(cases["case_a_t2v_v2"]), cases


def test_runner_steps_equal_fresh_packing(fixture_model):
    """Two steps through one prepared input equal pack -> DiT -> unpack from scratch, bit for bit."""
    model, cases = fixture_model
    case = cases["case_a_t2v_v2"]
    f = load_file(FIXTURES / "dit_tiny_case_a_t2v_v2.safetensors")
    runner = DiTRunner(model, compute_dtype=torch.float32)
    inputs = runner.prepare(f["in_video_latent"].shape, case["A"], f["in_txt_feat"], case["L"])
    gen = torch.Generator().manual_seed(0)
    for step in range(2):
        video = f["in_video_latent"] + step * torch.randn(f["in_video_latent"].shape, generator=gen)
        audio = f["in_audio_latent"] + step * torch.randn(f["in_audio_latent"].shape, generator=gen)
        with torch.no_grad():
            got = runner.velocity(inputs, video, audio)
            packed = pack(video, audio, f["in_txt_feat"], num_text=case["L"], in_channels=model.config.in_channels)
            ref = unpack(model(packed.x, packed.coords, packed.modality, spans=packed.spans,
                               compute_dtype=torch.float32), packed, 64)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), step
    assert runner.shapes == {(inputs.length, inputs.length)}


@pytest.mark.parametrize("name", ["case_a_t2v_v2", "case_b_sr_v1", "case_e_local_attn_v2"])
def test_bucketed_text_equals_unpadded_within_fixture_tolerance(fixture_model, name):
    """Text padded to a bucket and masked out of attention gives the fixtures' fp32 output; without the
    mask (padding attended to) it does not, so the mask is what makes them equal."""
    _, cases = fixture_model
    case = cases[name]
    model = case_model(case)
    f = load_file(FIXTURES / f"dit_tiny_{name}.safetensors")
    ref = unpack(f["dit_out_fp32path"], pack(f["in_video_latent"], f["in_audio_latent"], f["in_txt_feat"],
                                             num_text=case["L"], coords_style=case["coords_style"]), 64)
    runner = DiTRunner(model, compute_dtype=torch.float32, coords_style=case["coords_style"],
                       text_buckets=(case["L"] + 9,), frame_receptive_field=case["frame_receptive_field"])
    inputs = runner.prepare(f["in_video_latent"].shape, case["A"], f["in_txt_feat"], case["L"])
    assert inputs.num_padding == 9 and inputs.length == inputs.valid_length + 9
    with torch.no_grad():
        video, audio = runner.velocity(inputs, f["in_video_latent"], f["in_audio_latent"])
        got, want = torch.cat([video.flatten(), audio.flatten()]), torch.cat([ref[0].flatten(), ref[1].flatten()])
        assert rel_l2(got, want) <= 1e-5
        unmasked = model(inputs.x, inputs.coords, inputs.modality, spans=inputs.spans,
                         local_ranges=inputs.local_ranges, compute_dtype=torch.float32)
        v_unmasked, _ = unpack(unmasked, inputs, 64)
    assert rel_l2(v_unmasked, ref[0]) > 1e-3


def test_bucket_choice():
    assert text_buckets_up_to(640) == (64, 128, 256, 384, 512, 640)
    assert text_buckets_up_to(256) == (64, 128, 256)
    assert [bucket_for(n, (64, 128, 256)) for n in (1, 64, 65, 256, 300)] == [64, 64, 128, 256, 300]
    assert bucket_for(37, None) == 37


# ---------------------------------------------------------------------------------------- engine


@pytest.fixture(scope="module")
def engine():
    eng = build_preview_engine(seed=0, compute_dtype=torch.float32, text_buckets="auto")
    eng.sampler = type(eng.sampler)(num_steps=1)
    return eng


@pytest.fixture(scope="module")
def identity(engine):
    image = np.random.default_rng(0).integers(0, 256, (128, 224, 3), dtype=np.uint8)
    return engine.prepare_identity(image, "a person")


def _dit_lengths(engine):
    seen: list[int] = []
    handle = engine.dit.register_forward_pre_hook(lambda module, args: seen.append(int(args[0].shape[0])))
    return seen, handle


def test_distinct_dit_shapes_are_bounded_by_the_buckets(engine, identity):
    """Eight prompt lengths from 1 to 300 bytes reach the DiT as at most 3 sequence lengths (preview
    buckets 64/128/256), each one a bucket; before bucketing every length was its own shape."""
    geo = SegmentGeometry.for_seconds(0.4, engine.width, engine.height)
    seen, handle = _dit_lengths(engine)
    try:
        for n in (1, 9, 40, 63, 64, 100, 200, 300):
            engine.generate(SegmentRequest(identity=identity, kind=SegmentKind.SPEAK, prompt="x" * n, seconds=0.4))
    finally:
        handle.remove()
    allowed = {geo.video_tokens + geo.audio_tokens + b for b in (64, 128, 256)}
    assert set(seen) <= allowed and len(set(seen)) == 3, sorted(set(seen))


def test_warm_up_runs_every_shape_generation_can_ask_for(engine, identity):
    report = engine.warm_up([0.4, 0.8], super_resolution=False)
    shapes = {(s["kind"], s["seconds"], s["text_rows"], s["seq_len"]) for s in report["shapes"]}
    expected = set()
    for seconds in (0.4, 0.8):
        geo = SegmentGeometry.for_seconds(seconds, engine.width, engine.height)
        # lip-sync of the same length: the encoded audio has one latent fewer (floor(25 s))
        lipsync = SegmentGeometry.for_audio_latents(geo.audio_latents - 1, engine.width, engine.height)
        expected |= {("speak", seconds, b, geo.sequence_length(b)) for b in (64, 128, 256)}
        expected |= {("lipsync", seconds, b, lipsync.sequence_length(b)) for b in (64, 128, 256)}
    assert shapes == expected and report["total_s"] >= max(s["first_call_s"] for s in report["shapes"])
    seen, handle = _dit_lengths(engine)
    try:
        engine.generate(SegmentRequest(identity=identity, prompt="hello there", seconds=0.8))
    finally:
        handle.remove()
    assert set(seen) <= {s["seq_len"] for s in report["shapes"]}
    with pytest.raises(EngineInputError, match="segment_seconds"):
        engine.warm_up([60.0])


def test_emoji_prompt_cost_is_bounded(engine, identity):
    """A 4,000-emoji prompt is 16,001 byte tokens; the text encoder sees at most 640 of them and the
    DiT at most max_text_tokens (256) text rows. Before, the encoder ran all 16,001."""
    prompt = "\U0001F600" * 4000
    assert engine.count_text_tokens(prompt) == 16_001 and engine.max_text_tokens == 256
    encoder_lengths: list[int] = []
    hook = engine.text_encoder.model.register_forward_pre_hook(
        lambda module, args, kwargs: encoder_lengths.append(int(kwargs["input_ids"].shape[1])), with_kwargs=True)
    seen, handle = _dit_lengths(engine)
    try:
        engine.generate(SegmentRequest(identity=identity, kind=SegmentKind.SPEAK, prompt=prompt, seconds=0.4))
    finally:
        hook.remove()
        handle.remove()
    geo = SegmentGeometry.for_seconds(0.4, engine.width, engine.height)
    assert encoder_lengths and max(encoder_lengths) <= 640
    assert seen and max(seen) - geo.video_tokens - geo.audio_tokens <= engine.max_text_tokens
    with pytest.raises(EngineInputError, match="prompt"):
        engine.count_text_tokens(None)  # type: ignore[arg-type]


def test_testpattern_counts_like_the_byte_tokenizer():
    engine = create_engine("testpattern", testpattern_delay_s=0.25)
    assert isinstance(engine, TestPatternEngine) and engine.generate_delay_s == 0.25
    assert engine.count_text_tokens("\U0001F600" * 4000) == 16_001 and engine.max_text_tokens == 640


def test_factory_refuses_unknown_presets():
    with pytest.raises(ValueError, match="unknown engine preset"):
        create_engine("huge")
    with pytest.raises(ValueError, match="checkpoint_dir"):
        create_engine("full")
    with pytest.raises(ValueError, match="text_buckets"):
        build_preview_engine(text_buckets=(64, 128))  # does not reach the preview's 256
