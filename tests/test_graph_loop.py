"""The distilled loop with static inputs and its CUDA-graph capture (engine.graphs, issue 17).

What this catches: step noise drawn up front in another order or from another generator state than
the loop's own draws (the output would differ from ``sample``), a static loop that drifts from
``sample`` (text and both lip-sync modes), a host synchronisation or a random draw creeping back into
the loop (it would make the CUDA-graph capture fail or freeze the noise into the graph), a static
buffer that keeps the previous request's text or mask, a backend whose DiT call has the older
signature (TensorRT, context parallel) receiving arguments it does not take, and an engine whose
graph-loop option changes its segments.

Exactness: with the same DiT call, :func:`engine.graphs.static_denoise` performs the same operations
on the same values as :func:`engine.sampler.sample` (sigmas as device scalars instead of CPU
scalars, the noise drawn earlier from the same generator state), so the outputs are compared with
``torch.equal``. The one deliberate difference: :class:`GraphLoop` always passes a global attention
mask, all True when the text fills its bucket exactly, where ``sample`` passes none; an attention
kernel may then sum in another order, so that case is compared at the fixtures' fp32 tolerance
(rel_l2 <= 1e-5, fixtures README §1.5).

The CUDA tests at the end (skipped without a GPU) check what only a GPU can: the capture, replays of
several graphs sharing one memory pool in any order, and no device-to-host copy in the loop.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch

from engine.api import CancelledError, SegmentKind, SegmentRequest
from engine.config import preview_config
from engine.dit import seeded_dit
from engine.factory import build_preview_engine
from engine.geometry import SegmentGeometry
from engine.graphs import GraphLoop, HostSyncRecorder, draw_step_noise, static_denoise
from engine.packing import packed_layout
from engine.runner import DiTRunner
from engine.sampler import DISTILL, SR, generator_noise, sample
from engine.schedules import flow_timesteps

WIDTH, HEIGHT = 224, 128  # the preview size
SECONDS = 0.2  # 6 audio latents, 2 latent frames: 56 video tokens
BUCKET = 64
TEXT_IN = preview_config().text_in_channels

TEXT = DISTILL
LIPSYNC_CLEAN = dataclasses.replace(DISTILL, a2v=True, keep_audio_clean=True)  # the engine's default
LIPSYNC_REFERENCE = dataclasses.replace(DISTILL, a2v=True, keep_audio_clean=False)  # re-noised (§17.6)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def dit():
    return seeded_dit(preview_config(), seed=0)


def make_runner(dit, dtype=torch.float32) -> DiTRunner:
    return DiTRunner(dit, compute_dtype=dtype, text_buckets=(BUCKET, 2 * BUCKET))


def segment_inputs(seed: int, seconds: float = SECONDS, device="cpu"):
    """Initial audio then video noise from a seeded generator (the pipeline's draw order, §4), an image
    latent, random text features, and the generator positioned where the loop starts."""
    geo = SegmentGeometry.for_seconds(seconds, WIDTH, HEIGHT)
    gen = torch.Generator(device=device).manual_seed(seed)
    audio = torch.randn(1, geo.audio_latents, 64, generator=gen, device=device)
    video = torch.randn(geo.latent_shape(48), generator=gen, device=device)
    other = torch.Generator().manual_seed(seed + 100)
    image = torch.randn(1, 48, 1, geo.latent_height, geo.latent_width, generator=other).to(device)
    features = torch.randn(640, TEXT_IN, generator=other).to(device)
    return gen, video, audio, image, features


def run_both(runner: DiTRunner, config, num_text: int, seed: int = 3):
    """(sample's result, GraphLoop's result) for one segment with the same seed."""
    gen, video, audio, image, features = segment_inputs(seed)
    state = gen.get_state()
    with torch.inference_mode():
        packed = runner.prepare(video.shape, audio.shape[1], features, num_text)
        expected = sample(runner.velocity_fn(packed), video, audio, config, image_latent=image,
                          noise_fn=generator_noise(gen))
        gen.set_state(state)
        noise = draw_step_noise(gen, video, audio, config.num_steps)
        got = GraphLoop(runner).run(packed, video, audio, config, noise, image_latent=image)
    return expected, got


# ---------------------------------------------------------------------------------------- noise


def test_step_noise_is_the_loops_own_draws():
    """Per step a video-shaped then an audio-shaped draw, the same values the loop's noise_fn makes."""
    video, audio = torch.zeros(1, 48, 2, 8, 14), torch.zeros(1, 6, 64)
    gen = torch.Generator().manual_seed(11)
    noise = draw_step_noise(gen, video, audio, 8)
    after = torch.randn(3, generator=gen)
    gen = torch.Generator().manual_seed(11)
    draw = generator_noise(gen)
    for k in range(8):
        assert torch.equal(noise.video[k], draw(video, "video"))
        assert torch.equal(noise.audio[k], draw(audio, "audio"))
    assert torch.equal(after, torch.randn(3, generator=gen))  # the generator is left where the loop leaves it
    assert noise.video.shape == (8, 1, 48, 2, 8, 14) and noise.audio.dtype == torch.float32
    with pytest.raises(ValueError, match="num_steps"):
        draw_step_noise(gen, video, audio, 0)


# ---------------------------------------------------------------------------------------- equality


@pytest.mark.parametrize("config, dtype", [(TEXT, torch.float32), (TEXT, torch.bfloat16),
                                           (LIPSYNC_CLEAN, torch.float32), (LIPSYNC_REFERENCE, torch.float32)],
                         ids=["text-fp32", "text-bf16", "lipsync-clean", "lipsync-reference"])
def test_static_loop_equals_sample(dit, config, dtype):
    """Padded text (40 tokens in the 64 bucket): bit-identical to sample() with the same seed."""
    (video, audio), (g_video, g_audio) = run_both(make_runner(dit, dtype), config, num_text=40)
    assert torch.equal(g_video, video)
    assert torch.equal(g_audio, audio)
    assert not torch.equal(video[:, :, 1:], torch.zeros_like(video[:, :, 1:]))


def test_lipsync_clean_keeps_the_audio_and_the_reference_steps_it(dit):
    gen, video, audio, image, features = segment_inputs(3)
    runner = make_runner(dit)
    with torch.inference_mode():
        packed = runner.prepare(video.shape, audio.shape[1], features, 40)
        noise = draw_step_noise(gen, video, audio, 8)
        loop = GraphLoop(runner)
        _, clean = loop.run(packed, video, audio, LIPSYNC_CLEAN, noise, image_latent=image)
        _, stepped = loop.run(packed, video, audio, LIPSYNC_REFERENCE, noise, image_latent=image)
    assert torch.equal(clean, audio) and clean is not audio
    assert rel_l2(stepped, audio) > 0.1
    assert len(loop) == 2  # whether the audio is stepped is part of the shape key


def test_text_filling_its_bucket_is_within_fp32_tolerance(dit):
    """64 tokens in the 64 bucket: sample() passes no mask, the graph loop an all-True one."""
    (video, audio), (g_video, g_audio) = run_both(make_runner(dit), TEXT, num_text=BUCKET)
    assert rel_l2(g_video, video) <= 1e-5 and rel_l2(g_audio, audio) <= 1e-5


def test_one_static_segment_serves_every_text_length_of_a_bucket(dit):
    """The static buffers take each request's text rows, rotary table and mask: a run after another
    text length of the same bucket equals a fresh loop's result."""
    runner = make_runner(dit)
    loop = GraphLoop(runner)
    results = {}
    for num_text, seed in ((64, 1), (10, 2), (40, 3)):
        gen, video, audio, image, features = segment_inputs(seed)
        with torch.inference_mode():
            packed = runner.prepare(video.shape, audio.shape[1], features, num_text)
            noise = draw_step_noise(gen, video, audio, 8)
            results[num_text] = loop.run(packed, video, audio, TEXT, noise, image_latent=image)
    assert len(loop) == 1
    (video, audio), _ = run_both(runner, TEXT, num_text=40, seed=3)
    assert torch.equal(results[40][0], video) and torch.equal(results[40][1], audio)


def test_static_denoise_without_image_and_with_other_steps(dit):
    runner = make_runner(dit)
    gen, video, audio, _, features = segment_inputs(5)
    config = dataclasses.replace(TEXT, num_steps=3)
    state = gen.get_state()
    with torch.inference_mode():
        packed = runner.prepare(video.shape, audio.shape[1], features, 40)
        expected = sample(runner.velocity_fn(packed), video, audio, config, noise_fn=generator_noise(gen))
        gen.set_state(state)
        noise = draw_step_noise(gen, video, audio, 3)
        sigmas = flow_timesteps(3)[1]
        got = static_denoise(lambda v, a: runner.velocity(packed, v, a), video, audio, sigmas, noise)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_bad_configs_and_inputs_are_refused(dit):
    runner = make_runner(dit)
    gen, video, audio, image, features = segment_inputs(1)
    loop = GraphLoop(runner)
    with torch.inference_mode():
        packed = runner.prepare(video.shape, audio.shape[1], features, 40)
        noise = draw_step_noise(gen, video, audio, 8)
        with pytest.raises(ValueError, match="distilled"):
            loop.run(packed, video, audio, SR, noise)
        with pytest.raises(ValueError, match="step noise"):
            loop.run(packed, video, audio, dataclasses.replace(TEXT, num_steps=4), noise)
        bare = packed_layout(tuple(video.shape[1:]), audio.shape[1], features, num_text=40, text_rows=BUCKET,
                             in_channels=dit.config.in_channels, audio_channels=64)
        with pytest.raises(ValueError, match="rope and masks"):
            loop.run(bare, video, audio, TEXT, noise)


# ---------------------------------------------------------------------------------------- host syncs


def test_the_static_loop_has_no_host_sync_and_no_random_draw(dit):
    runner = make_runner(dit)
    gen, video, audio, image, features = segment_inputs(7)
    loop = GraphLoop(runner)
    with torch.inference_mode():
        packed = runner.prepare(video.shape, audio.shape[1], features, 40)
        noise = draw_step_noise(gen, video, audio, 8)
        with HostSyncRecorder() as first:  # allocates the static segment
            loop.run(packed, video, audio, LIPSYNC_REFERENCE, noise, image_latent=image)
        with HostSyncRecorder() as again:
            loop.run(packed, video, audio, LIPSYNC_REFERENCE, noise, image_latent=image)
    for rec in (first, again):
        assert rec.ops > 1000  # the recorder saw the 8 DiT calls
        assert rec.syncs == [] and rec.random_draws == []


def test_the_recorder_catches_the_old_loop(dit):
    """sample() through the DiT call as it was (rotary table and its finiteness check at every call)
    synchronises once per step, and sample() draws its noise inside the loop in any case."""
    runner = make_runner(dit)
    gen, video, audio, image, features = segment_inputs(7)
    with torch.inference_mode():
        old = packed_layout(tuple(video.shape[1:]), audio.shape[1], features, num_text=40, text_rows=BUCKET,
                            in_channels=dit.config.in_channels, audio_channels=64)
        with HostSyncRecorder() as rec_old:
            sample(runner.velocity_fn(old), video, audio, TEXT, image_latent=image, noise_fn=generator_noise(gen))
        packed = runner.prepare(video.shape, audio.shape[1], features, 40)
        with HostSyncRecorder() as rec_new:
            sample(runner.velocity_fn(packed), video, audio, TEXT, image_latent=image, noise_fn=generator_noise(gen))
    assert rec_old.syncs == ["aten.is_nonzero.default"] * 8
    assert rec_old.random_draws == ["aten.randn.generator"] * 16
    assert rec_new.syncs == [] and rec_new.random_draws == ["aten.randn.generator"] * 16


def test_the_recorder_names_scalar_reads_and_data_dependent_shapes():
    x = torch.tensor([0.0, 1.0, 2.0])
    with HostSyncRecorder() as rec:
        y = x * 2 + 1
        x.sum().item()
        torch.nonzero(y)
        bool(x.any())
        torch.rand(2, generator=torch.Generator().manual_seed(0))
    assert rec.syncs[:2] == ["aten._local_scalar_dense.default", "aten.nonzero.default"]
    assert rec.syncs[2:] in (["aten.is_nonzero.default"], ["aten._local_scalar_dense.default"])  # bool()
    assert rec.random_draws == ["aten.rand.generator"]


# ---------------------------------------------------------------------------------------- backends


def test_capturable_only_on_cuda_with_a_static_dit_call(dit):
    runner = make_runner(dit)
    loop = GraphLoop(runner)
    assert runner.takes_static_inputs
    assert loop.capturable(torch.device("cuda")) and not loop.capturable(torch.device("cpu"))
    assert not GraphLoop(runner, capture=False).capturable(torch.device("cuda"))
    runner.before_call = lambda: None  # reduce-overhead compile marks CUDA-graph steps itself
    assert not loop.capturable(torch.device("cuda"))


def test_an_older_dit_signature_gets_valid_length_and_still_matches(dit):
    """A DiT call with the older signature (context parallel's DistributedDiT) is called without
    rope/masks, is never captured, and the eager static loop still equals sample(); nor is a step that is
    no DiTStep (TensorRT's) captured."""
    model = seeded_dit(preview_config(), seed=0)
    calls = []

    def older_forward(x, coords, modality, *, spans=None, local_ranges=None, compute_dtype=None,
                      exact_attention=None, intermediates=None, valid_length=None):
        calls.append(valid_length)
        return type(model).forward(model, x, coords, modality, spans=spans, local_ranges=local_ranges,
                                   compute_dtype=compute_dtype, valid_length=valid_length)

    model.forward = older_forward
    runner = make_runner(model)
    assert not runner.takes_static_inputs and not GraphLoop(runner).capturable(torch.device("cuda"))
    (video, audio), (g_video, g_audio) = run_both(runner, TEXT, num_text=40)
    assert calls == [56 + 6 + 40] * 16
    (ref_video, _), _ = run_both(make_runner(dit), TEXT, num_text=40)
    assert torch.equal(g_video, video) and torch.equal(g_audio, audio) and torch.equal(video, ref_video)
    runner.forward = lambda packed: torch.zeros(packed.length, 192)
    assert not runner.takes_static_inputs


def test_a_backend_change_drops_the_static_segments(dit):
    from engine.backends import apply_backend

    runner = make_runner(dit)
    loop = GraphLoop(runner)
    gen, video, audio, image, features = segment_inputs(2)
    with torch.inference_mode():
        packed = runner.prepare(video.shape, audio.shape[1], features, 40)
        noise = draw_step_noise(gen, video, audio, 8)
        loop.run(packed, video, audio, TEXT, noise)
        loop.run(packed, video, audio, TEXT, noise)
        assert len(loop) == 1 and loop.allocations == 1  # the second run reuses the first's buffers
        apply_backend(runner, "fast", "cpu")
        assert runner.takes_static_inputs  # the fast step passes them with its attention kernel
        loop.run(packed, video, audio, TEXT, noise)
        assert len(loop) == 1 and loop.allocations == 2  # new buffers for the new step


class RecordingCaptures(GraphLoop):
    """The capture policy without a GPU: capturable everywhere, the capture call recorded (the capture
    itself is checked by the CUDA tests below)."""

    def capturable(self, device):
        return True

    def _capture(self, key, segment):
        self.captures += 1
        self.captured.append(key)


def test_capture_policy_second_run_warm_up_at_once_and_lru_bound(dit):
    runner = make_runner(dit)
    loop = RecordingCaptures(runner, max_shapes=2)
    loop.captured = []
    config = dataclasses.replace(TEXT, num_steps=1)
    with torch.inference_mode():
        def run(seconds, num_text, **kwargs):
            gen, video, audio, _, features = segment_inputs(1, seconds)
            packed = runner.prepare(video.shape, audio.shape[1], features, num_text)
            loop.run(packed, video, audio, config, draw_step_noise(gen, video, audio, 1), **kwargs)
            return loop.key(packed, config, False)

        a = run(SECONDS, 40)
        assert loop.captured == []  # a one-off shape is not captured
        assert run(SECONDS, 10) == a and loop.captured == [a]  # its second run (another text length) is
        b = run(SECONDS, 100, capture_now=True)  # warm_up: at once
        assert loop.captured == [a, b]
        c = run(0.4, 40)
        assert len(loop) == 2 and a not in loop.keys()  # least recently used dropped
        run(SECONDS, 40)  # a again: a new static segment, its first run
        assert loop.captured == [a, b] and loop.keys() == [c, a]
    with pytest.raises(ValueError, match="capture_after"):
        GraphLoop(runner, capture_after=0)


def test_bench_times_the_graph_loop_against_sample(dit):
    """ops.bench --graph-loop's figures: the loop equals sample() (relative error 0 on CPU), not captured."""
    import argparse

    from ops.bench import bench_graph_loop

    runner = make_runner(dit)
    _, video, audio, _, features = segment_inputs(4)
    args = argparse.Namespace(seed=4, warmup=0, loop_repeats=1)
    config = dataclasses.replace(TEXT, num_steps=2)
    with torch.inference_mode():
        packed = runner.prepare(video.shape, audio.shape[1], features, 40)
    figures = bench_graph_loop(args, runner, packed, config, video, audio)
    assert figures["rel_err_graph_vs_sample"] == 0.0 and figures["graph_captured"] is False
    assert len(figures["dit_8step_graph_s_all"]) == 1 and figures["dit_8step_graph_s"] > 0
    assert figures["graph_first_call_s"] > 0


# ---------------------------------------------------------------------------------------- engine


@pytest.fixture(scope="module")
def engine():
    return build_preview_engine(seed=0, graph_loop=True, compute_dtype=torch.float32)


@pytest.fixture(scope="module")
def identity(engine):
    image = np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    return engine.prepare_identity(image, "test identity")


def generate_both(engine, request):
    loop = engine.graph_loop
    try:
        with_graph = engine.generate(request)
        engine.graph_loop = None
        without = engine.generate(request)
    finally:
        engine.graph_loop = loop
    return with_graph, without


def test_graph_loop_is_off_on_cpu_by_default():
    assert build_preview_engine(seed=0).graph_loop is None


def test_engine_segments_are_unchanged_by_the_graph_loop(engine, identity):
    request = SegmentRequest(identity=identity, kind=SegmentKind.SPEAK, prompt="hello there", seconds=SECONDS, seed=9)
    with_graph, without = generate_both(engine, request)
    assert torch.equal(with_graph.continuation.video_latent, without.continuation.video_latent)
    assert torch.equal(with_graph.continuation.audio_latent, without.continuation.audio_latent)
    assert np.array_equal(with_graph.frames, without.frames)
    assert with_graph.timings_s["dit"] > 0


def test_engine_lipsync_segments_are_unchanged_by_the_graph_loop(engine, identity):
    rate = 16_000
    t = np.arange(int(SECONDS * rate)) / rate
    audio = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    request = SegmentRequest(identity=identity, kind=SegmentKind.LIPSYNC, seconds=SECONDS, seed=4, audio=audio,
                             audio_sample_rate=rate)
    with_graph, without = generate_both(engine, request)
    assert torch.equal(with_graph.continuation.video_latent, without.continuation.video_latent)
    assert np.array_equal(with_graph.frames, without.frames)


def test_cancel_acts_before_the_whole_loop(engine, identity):
    cancel = threading.Event()
    cancel.set()
    request = SegmentRequest(identity=identity, kind=SegmentKind.SPEAK, prompt="x", seconds=SECONDS, seed=1)
    with pytest.raises(CancelledError, match="before denoising"):
        engine.generate(request, cancel)


def test_warm_up_runs_the_loop_of_every_shape(engine):
    report = engine.warm_up([SECONDS])
    rows = engine.text_rows_options()
    dit_shapes = [s for s in report["shapes"] if s["model"] == "dit"]
    speak_shapes = [s for s in dit_shapes if s["kind"] == "speak"]
    assert [s["text_rows"] for s in speak_shapes] == list(rows) and all(s["graph_loop"] for s in dit_shapes)
    geo = SegmentGeometry.for_seconds(SECONDS, WIDTH, HEIGHT)
    keys = {k for k in engine.graph_loop.keys() if k[1] == geo.audio_latents and k[5]}
    assert {k[2] - geo.video_tokens - geo.audio_latents for k in keys} >= set(rows)
    # the lip-sync shape of the same length: one audio latent fewer (a2v loop)
    assert [s["kind"] for s in dit_shapes] == ["speak"] * len(rows) + ["lipsync"] * len(rows)
    lipsync = SegmentGeometry.for_audio_latents(geo.audio_latents - 1, WIDTH, HEIGHT)
    keys = {k for k in engine.graph_loop.keys() if k[1] == lipsync.audio_latents}
    assert {k[2] - lipsync.video_tokens - lipsync.audio_latents for k in keys} >= set(rows)


# ---------------------------------------------------------------------------------------- CUDA only

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (graph capture and replay)")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graph_replay_equals_the_eager_loop_and_sample(dtype):
    """One capture per shape; replays of two graphs sharing one pool, in alternating order, equal the
    eager static loop and sample() with the same CUDA generator seed. Tolerance: the fp32 one of the
    fixtures (1e-5) in fp32; in bf16 the capture may pick other GEMM algorithms, whose rounding 8 steps
    amplify, so 2e-2 (a stale buffer or a wrong draw gives ~1)."""
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    model = seeded_dit(preview_config(), seed=0, device="cuda")
    runner = make_runner(model, dtype)
    graphs, eager = GraphLoop(runner), GraphLoop(runner, capture=False)
    cases = [(seconds, num_text, seed) for seed in (1, 2) for seconds, num_text in ((SECONDS, 40), (0.4, 100))]
    with torch.inference_mode():
        for seconds, num_text, seed in cases:
            gen, video, audio, image, features = segment_inputs(seed, seconds, device="cuda")
            state = gen.get_state()
            packed = runner.prepare(video.shape, audio.shape[1], features, num_text)
            expected = sample(runner.velocity_fn(packed), video, audio, TEXT, image_latent=image,
                              noise_fn=generator_noise(gen))
            gen.set_state(state)
            noise = draw_step_noise(gen, video, audio, 8)
            got = graphs.run(packed, video, audio, TEXT, noise, image_latent=image)
            ref = eager.run(packed, video, audio, TEXT, noise, image_latent=image)
            assert rel_l2(got[0], ref[0]) <= tol and rel_l2(got[1], ref[1]) <= tol
            assert rel_l2(got[0], expected[0]) <= tol and rel_l2(got[1], expected[1]) <= tol
    assert graphs.captures == 2 and not graphs.failures


@cuda
def test_cuda_static_loop_has_no_device_to_host_copy():
    model = seeded_dit(preview_config(), seed=0, device="cuda")
    runner = make_runner(model, torch.bfloat16)
    gen, video, audio, image, features = segment_inputs(3, device="cuda")
    with torch.inference_mode():
        packed = runner.prepare(video.shape, audio.shape[1], features, 40)
        noise = draw_step_noise(gen, video, audio, 8)
        loop = GraphLoop(runner, capture=False)
        loop.run(packed, video, audio, TEXT, noise, image_latent=image)
        with HostSyncRecorder() as rec:
            loop.run(packed, video, audio, TEXT, noise, image_latent=image)
        with HostSyncRecorder() as rec_cpu_copy:
            video.cpu()
    assert rec.syncs == [] and rec.random_draws == []
    assert rec_cpu_copy.syncs  # the recorder sees a device-to-host copy


@cuda
def test_cuda_engine_captures_in_warm_up_and_replays_while_serving():
    """warm_up captures one graph per text bucket and kind (speak, lip-sync); a request of a warmed
    shape replays it (no new capture) and matches sample(). The codecs are left out (only the DiT
    runs here)."""
    engine = build_preview_engine(seed=0, device="cuda")
    assert engine.graph_loop is not None  # on by default for CUDA
    report = engine.warm_up([SECONDS], super_resolution=False)
    assert engine.graph_loop.captures == len(report["shapes"]) == 2 * len(engine.text_rows_options())
    assert not engine.graph_loop.failures
    config = dataclasses.replace(engine.sampler, a2v=False, keep_audio_clean=engine.keep_audio_clean)
    gen, video, audio, image, features = segment_inputs(9, device="cuda")
    features = features[:, :engine.dit.config.text_in_channels]
    state = gen.get_state()
    with torch.inference_mode():
        packed = engine.runner.prepare(video.shape, audio.shape[1], features, 40)
        expected = sample(engine.runner.velocity_fn(packed), video, audio, config, image_latent=image,
                          noise_fn=generator_noise(gen))
        gen.set_state(state)
        got = engine.graph_loop.run(packed, video, audio, config, draw_step_noise(gen, video, audio, 8),
                                    image_latent=image)
    assert engine.graph_loop.captures == len(report["shapes"])  # no capture while serving
    assert rel_l2(got[0], expected[0]) <= 2e-2 and rel_l2(got[1], expected[1]) <= 2e-2  # bf16, see above
