"""The distilled denoising loop with static inputs, captured whole as one CUDA graph (issue 17).

:func:`engine.sampler.sample` is the general loop: it iterates the timesteps on the host, checks a
cancel event and draws the step noise from a generator at every step, so it cannot be captured.
This module runs the distilled configuration (``cfg_number`` 1, base stage, PIPELINE.md §10.3, §12)
as a loop without host work between its device operations:

* the schedule is computed once (:func:`flow_timesteps`); the sigmas live on the device and the
  steps are unrolled (each step reads ``sigmas[k]``, a device view, never a host number);
* the noise of every step is drawn up front by :func:`draw_step_noise` into ``[steps, ...]`` buffers
  in the reference's draw order (per step: video-shaped, then audio-shaped, also at the last step;
  PIPELINE.md §4.3), from the same generator and after the same earlier draws as the loop would make,
  so the values are the loop's own;
* every DiT call gets the segment's precomputed rotary table and attention masks
  (:meth:`engine.runner.DiTRunner.prepare`), so the DiT does no host synchronisation either, and the
  latents are written into the static ``PackedInputs.x`` (:func:`engine.packing.write_latents`).

:func:`static_denoise` is that loop. It equals :func:`sample` with the same generator bit for bit
whenever the DiT call is the same; :class:`GraphLoop` always passes a global attention mask (an
all-True one when the text fills its bucket exactly, so that one graph serves every text length of a
bucket), and only in that exact-fit case the attention kernel may differ from ``sample``'s unmasked one:
equal within fp32 summation order there (tests/test_graph_loop.py).

:class:`GraphLoop` keeps one set of static buffers per shape key (latent shape, audio tokens, text rows,
steps, whether audio is stepped, whether an image latent conditions frame 0), copies each request's
inputs into them and runs :func:`static_denoise` on them. On CUDA with a DiT call that can be captured
(:meth:`GraphLoop.capturable`: the runner passes static inputs and no backend CUDA graphs of its own)
the loop is captured once per key with ``torch.cuda.graph`` after a warm-up on a side stream (at the
key's second run, or at once from :meth:`engine.pipeline.MagiHumanEngine.warm_up`) and then replayed; everywhere else (CPU, TensorRT, context parallel, ``reduce-overhead`` compile) the same buffers
and the same function run eagerly, so CPU tests cover every line but the capture and replay calls.

Cancellation acts per segment: nothing is checked inside the loop (a replay cannot be stopped), so a
cancel set during the loop takes effect when it returns (the caller checks before and after).

:class:`HostSyncRecorder` is the check that a region has no host synchronisation: a
``TorchDispatchMode`` recording every operation that returns a host value (``aten._local_scalar_dense``,
``aten.is_nonzero``, ``aten.item``, ``aten.equal``, ...), whose output shape depends on data
(``nonzero``, ``unique``, ``masked_select``...), that copies from an accelerator to the CPU, or that
draws from a random generator.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.packing import PackedInputs
from engine.runner import DiTRunner
from engine.sampler import SamplerConfig
from engine.schedules import flow_timesteps, step_ddim

logger = logging.getLogger(__name__)

__all__ = [
    "GraphLoop",
    "HostSyncRecorder",
    "StepNoise",
    "check_static_config",
    "draw_step_noise",
    "static_denoise",
    "steps_audio",
]

StaticVelocity = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``(video [1, C, T, h, w], audio [1, A, 64]) -> (v_video, v_audio)``: one DiT call, no host sync."""


@dataclass
class StepNoise:
    """The Gaussian draws of every distilled step.

    Attributes:
        video: fp32 ``[steps, 1, C, T, h, w]``; ``video[k]`` is step ``k``'s video-shaped draw.
        audio: fp32 ``[steps, 1, A, 64]``; ``audio[k]`` is step ``k``'s audio-shaped draw.
    """

    video: torch.Tensor
    audio: torch.Tensor


def draw_step_noise(generator: torch.Generator | None, video: torch.Tensor, audio: torch.Tensor,
                    num_steps: int) -> StepNoise:
    """Draw the noise of ``num_steps`` distilled steps up front, in the loop's order (PIPELINE.md §4.3):
    for each step a ``randn`` shaped like ``video``, then one shaped like ``audio``, fp32, on their devices.

    Called where :func:`engine.sampler.sample` would start its loop (after the initial noise), it consumes
    ``generator`` exactly as :func:`engine.sampler.generator_noise` inside that loop does, so step ``k``'s
    draws are the same values. The audio draws are made even when the audio is not stepped (lip-sync with
    ``keep_audio_clean``), as the loop does, so that the video draws stay in place.

    Args:
        generator: the request's generator (None: the global one).
        video: ``[1, C, T, h, w]`` latent (shape and device only).
        audio: ``[1, A, 64]`` latent (shape and device only).
        num_steps: steps ``N >= 1``.

    Raises:
        ValueError: ``num_steps < 1``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    noise_video = torch.empty((num_steps, *video.shape), dtype=torch.float32, device=video.device)
    noise_audio = torch.empty((num_steps, *audio.shape), dtype=torch.float32, device=audio.device)
    for k in range(num_steps):
        torch.randn(video.shape, generator=generator, out=noise_video[k])
        torch.randn(audio.shape, generator=generator, out=noise_audio[k])
    return StepNoise(noise_video, noise_audio)


def check_static_config(config: SamplerConfig) -> None:
    """Raise ValueError unless ``config`` is a distilled configuration (the only one looped statically)."""
    if not config.distilled or config.sde:
        raise ValueError("the static loop runs the distilled configuration only (cfg_number 1, base stage, "
                         f"no SDE); got cfg_number {config.cfg_number}, stage {config.stage!r}, sde {config.sde}")


def steps_audio(config: SamplerConfig) -> bool:
    """Whether the distilled loop steps the audio latent (PIPELINE.md §10.4): always, except lip-sync with
    the ``keep_audio_clean`` deviation (as :func:`engine.sampler.sample` decides)."""
    return not (config.a2v and config.keep_audio_clean)


def static_denoise(velocity: StaticVelocity, video: torch.Tensor, audio: torch.Tensor, sigmas: torch.Tensor,
                   noise: StepNoise, *, step_audio: bool = True,
                   image_latent: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The distilled loop (PIPELINE.md §10.3, §16) with every input on the device: no host reads, no
    random draws, no cancel checks, the ``N = len(sigmas) - 1`` steps unrolled.

    Per step ``k``: frame 0 of ``video`` is overwritten with ``image_latent`` (§7); ``v = velocity(video,
    audio)``; ``video = step_ddim(v_video, video, sigmas[k], sigmas[k+1], noise.video[k])`` and likewise
    the audio when ``step_audio``. After the last step frame 0 is overwritten once more.

    Args:
        velocity: one DiT call (:data:`StaticVelocity`).
        video: fp32 ``[1, C, T, h, w]`` initial video latent (not modified).
        audio: fp32 ``[1, A, 64]`` initial audio latent (not modified).
        sigmas: fp32 ``[N + 1]`` on the latents' device (:func:`engine.schedules.flow_timesteps`).
        noise: the step draws (:func:`draw_step_noise`), ``N`` of each.
        step_audio: step the audio latent (:func:`steps_audio`).
        image_latent: fp32 ``[1, C, 1, h, w]`` or None.

    Returns:
        (video, audio): fp32 final latents, new tensors.
    """
    steps = sigmas.shape[0] - 1
    for k in range(steps):
        if image_latent is not None:
            video = video.clone()
            video[:, :, :1] = image_latent[:, :, :1]
        v_video, v_audio = velocity(video, audio)
        sigma, sigma_next = sigmas[k], sigmas[k + 1]
        video = step_ddim(v_video, video, sigma, sigma_next, noise.video[k])
        if step_audio:
            audio = step_ddim(v_audio, audio, sigma, sigma_next, noise.audio[k])
    if image_latent is not None:
        video = video.clone()
        video[:, :, :1] = image_latent[:, :, :1]
    return video, audio


ShapeKey = tuple
"""``(latent_shape (C, T, h, w), audio tokens, sequence length L, steps, shift, step_audio, has_image)``."""


class _StaticSegment:
    """The static buffers of one shape key and, on CUDA, its captured graph."""

    def __init__(self, runner: DiTRunner, packed: PackedInputs, video: torch.Tensor, audio: torch.Tensor,
                 sigmas: torch.Tensor, noise: StepNoise, step_audio: bool, image_latent: torch.Tensor | None):
        self.runner = runner
        global_mask, local_mask = packed.masks if packed.masks is not None else (None, None)
        if global_mask is None:  # one graph for every text length of the bucket: always a mask
            global_mask = torch.ones(packed.length, packed.length, dtype=torch.bool, device=packed.x.device)
        self.packed = PackedInputs(
            packed.x.clone(), packed.coords.clone(), packed.modality.clone(), list(packed.spans),
            packed.local_ranges, packed.latent_shape, packed.num_video, packed.num_audio, packed.num_text,
            packed.num_padding, rope=packed.rope.clone(),
            masks=(global_mask.clone(), None if local_mask is None else local_mask.clone()))
        self.video, self.audio = video.clone(), audio.clone()
        self.sigmas = sigmas
        self.noise = StepNoise(noise.video.clone(), noise.audio.clone())
        self.step_audio = step_audio
        self.image_latent = None if image_latent is None else image_latent[:, :, :1].float().clone()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple[torch.Tensor, torch.Tensor] | None = None

    def load(self, packed: PackedInputs, video: torch.Tensor, audio: torch.Tensor, noise: StepNoise,
             image_latent: torch.Tensor | None) -> None:
        """Copy one request's inputs into the static buffers (device copies, no sync)."""
        static = self.packed
        static.x.copy_(packed.x)
        static.rope.copy_(packed.rope)
        global_mask, local_mask = packed.masks
        if global_mask is None:
            static.masks[0].fill_(True)
        else:
            static.masks[0].copy_(global_mask)
        if local_mask is not None:
            static.masks[1].copy_(local_mask)
        static.num_text, static.num_padding = packed.num_text, packed.num_padding
        self.video.copy_(video)
        self.audio.copy_(audio)
        self.noise.video.copy_(noise.video)
        self.noise.audio.copy_(noise.audio)
        if image_latent is not None:
            self.image_latent.copy_(image_latent[:, :, :1])

    def velocity(self, video: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.runner.velocity(self.packed, video, audio)

    def body(self) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`static_denoise` on the static buffers (what is captured)."""
        return static_denoise(self.velocity, self.video, self.audio, self.sigmas, self.noise,
                              step_audio=self.step_audio, image_latent=self.image_latent)

    def capture(self, pool, warmup_runs: int) -> None:
        """Warm up on a side stream, then capture :meth:`body` into one CUDA graph (PyTorch's "whole
        network capture" recipe). The outputs of the capture stay the graph's static outputs.

        Every graph of a :class:`GraphLoop` shares one memory pool: a later capture may place its
        intermediates (and its outputs) in memory that an earlier graph uses as scratch. That is safe
        here because replays never overlap (the engine's lock), every static input lives outside the
        pool, and :meth:`run` copies the outputs out right after the replay, before another graph runs."""
        device = self.video.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup_runs):
                self.body()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the server's other threads (identity encodes, decodes) may use CUDA meanwhile
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            outputs = self.body()
        self.graph, self.outputs = graph, outputs

    def run(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the graph (or run the body eagerly) and return fresh copies of the final latents."""
        if self.graph is None:
            video, audio = self.body()
        else:
            self.graph.replay()
            video, audio = self.outputs
        return video.clone(), audio.clone()


class GraphLoop:
    """The distilled loop of one :class:`engine.runner.DiTRunner`, one static segment (and on CUDA one
    captured graph) per shape key; see the module doc.

    Args:
        runner: the runner whose step the loop calls (its backend applied before or after: a new
            ``runner.forward`` is noticed and the cache dropped).
        capture: capture CUDA graphs when the device is CUDA and :meth:`capturable` holds (default
            True); False runs the static loop eagerly everywhere.
        warmup_runs: eager runs on a side stream before a capture (cuBLAS/compile warm-up).
        capture_after: a shape is captured at its ``capture_after``-th run (default 2), unless
            :meth:`run` is asked to capture at once (``warm_up``): a one-off shape (a lip-sync clip of an
            unusual length) then costs no capture (two loop runs), only one eager run.
        max_shapes: static segments kept at most, least recently used dropped first (each holds the
            inputs of one segment, ~100 MB for a 5 s 448x256 segment of the full model).

    Attributes:
        captures: number of graphs captured so far; failures: keys whose capture raised (they run
            eagerly, logged once).
        allocations: static segments (input buffers) built so far; a kept shape reuses its own.
    """

    def __init__(self, runner: DiTRunner, *, capture: bool = True, warmup_runs: int = 1, capture_after: int = 2,
                 max_shapes: int = 64):
        if capture_after < 1 or max_shapes < 1:
            raise ValueError(f"capture_after {capture_after} and max_shapes {max_shapes} must be >= 1")
        self.runner = runner
        self.capture = capture
        self.warmup_runs = warmup_runs
        self.capture_after, self.max_shapes = capture_after, max_shapes
        self._segments: OrderedDict[ShapeKey, _StaticSegment] = OrderedDict()
        self._runs: Counter[ShapeKey] = Counter()
        self._sigmas: dict[tuple, torch.Tensor] = {}
        self._pool = None
        self._step = runner.forward
        self.captures = 0
        self.allocations = 0
        self.failures: set[ShapeKey] = set()

    def capturable(self, device: torch.device) -> bool:
        """True when the loop is captured on ``device``: CUDA, ``capture`` on, the runner's step passes the
        precomputed rope/masks (:attr:`DiTRunner.takes_static_inputs`: not TensorRT, not context parallel)
        and no ``before_call`` hook (``reduce-overhead`` compile manages CUDA graphs of its own)."""
        return (self.capture and torch.device(device).type == "cuda" and self.runner.before_call is None
                and self.runner.takes_static_inputs)

    def clear(self) -> None:
        """Drop every static segment and graph (e.g. after a backend change)."""
        self._segments.clear()
        self._runs.clear()
        self._sigmas.clear()
        self.failures.clear()

    def key(self, packed: PackedInputs, config: SamplerConfig, has_image: bool) -> ShapeKey:
        """The cache key of a segment (see :data:`ShapeKey`)."""
        return (tuple(packed.latent_shape), packed.num_audio, packed.length, config.num_steps, config.shift,
                steps_audio(config), has_image)

    def __len__(self) -> int:
        return len(self._segments)

    def keys(self) -> list[ShapeKey]:
        """The shape keys kept, least recently used first."""
        return list(self._segments)

    def sigmas(self, config: SamplerConfig, device: torch.device) -> torch.Tensor:
        """fp32 ``[N + 1]`` sigmas of ``config`` on ``device``, computed once."""
        key = (config.num_steps, config.shift, str(device))
        if key not in self._sigmas:
            self._sigmas[key] = flow_timesteps(config.num_steps, config.shift)[1].to(device)
        return self._sigmas[key]

    def run(self, packed: PackedInputs, video: torch.Tensor, audio: torch.Tensor, config: SamplerConfig,
            noise: StepNoise, *, image_latent: torch.Tensor | None = None,
            capture_now: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Denoise one segment: what :func:`engine.sampler.sample` returns for the same inputs with
        ``noise_fn`` drawing ``noise`` (see the module doc for exactness).

        Args:
            packed: the segment's :meth:`DiTRunner.prepare` output (its ``rope`` and ``masks`` set).
            video: fp32 ``[1, C, T, h, w]`` initial noise; audio: fp32 ``[1, A, 64]`` initial audio latent.
            config: a distilled :class:`SamplerConfig` (``a2v``/``keep_audio_clean`` honoured).
            noise: :func:`draw_step_noise` for ``config.num_steps`` steps.
            image_latent: fp32 ``[1, C, 1, h, w]`` written into frame 0 (§7), or None.
            capture_now: capture this shape now (where :meth:`capturable`), not at its ``capture_after``-th run.

        Returns:
            (video, audio): fp32 final latents (new tensors, not the static buffers).

        Raises:
            ValueError: a non-distilled ``config``, ``packed`` without ``rope``/``masks``, or noise of the
                wrong shape.
        """
        check_static_config(config)
        if packed.rope is None or packed.masks is None:
            raise ValueError("packed inputs need rope and masks: build them with DiTRunner.prepare")
        steps = config.num_steps
        if tuple(noise.video.shape) != (steps, *video.shape) or tuple(noise.audio.shape) != (steps, *audio.shape):
            raise ValueError(f"step noise {tuple(noise.video.shape)}, {tuple(noise.audio.shape)} does not match "
                             f"{steps} steps of video {tuple(video.shape)} and audio {tuple(audio.shape)}")
        if self.runner.forward is not self._step:  # a backend was applied: graphs of the old step are stale
            self.clear()
            self._step = self.runner.forward
        device = video.device
        key = self.key(packed, config, image_latent is not None)
        segment = self._segments.get(key)
        if segment is None:
            segment = _StaticSegment(self.runner, packed, video, audio, self.sigmas(config, device), noise,
                                     steps_audio(config), image_latent)
            self._segments[key] = segment
            self.allocations += 1
            while len(self._segments) > self.max_shapes:
                old, _ = self._segments.popitem(last=False)
                self._runs.pop(old, None)
        self._segments.move_to_end(key)
        self._runs[key] += 1
        segment.load(packed, video, audio, noise, image_latent)
        wanted = capture_now or self._runs[key] >= self.capture_after
        if segment.graph is None and wanted and key not in self.failures and self.capturable(device):
            self._capture(key, segment)
        return segment.run()

    def _capture(self, key: ShapeKey, segment: _StaticSegment) -> None:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            segment.capture(self._pool, self.warmup_runs)
        except Exception:  # noqa: BLE001 - a kernel that cannot be captured: run this key eagerly
            logger.exception("CUDA graph capture of the denoising loop failed for %s; running it eagerly", key)
            self.failures.add(key)
            segment.graph, segment.outputs = None, None
            return
        self.captures += 1
        logger.info("captured the %d-step denoising loop for %s", key[3], key)


class HostSyncRecorder(TorchDispatchMode):
    """Records the operations of a region that need the host to wait for the device, or that draw random
    numbers (see the module doc). Use as a context manager around eager code::

        with HostSyncRecorder() as rec:
            loop()
        assert not rec.syncs and not rec.random_draws

    Attributes:
        syncs: names of the operations that return host values, have data-dependent output shapes or copy
            from an accelerator to the CPU, in call order.
        random_draws: names of the operations that take a random generator, in call order.
        ops: number of operations seen.
    """

    DATA_DEPENDENT = ("aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique", "aten.unique_consecutive",
                      "aten.unique_dim", "aten.repeat_interleave.Tensor")

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []
        self.random_draws: list[str] = []
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        name = str(func)
        schema = func._schema
        if any(not _is_tensor_type(r.type) for r in schema.returns) or name.startswith(self.DATA_DEPENDENT):
            self.syncs.append(name)
        if any(a.name == "generator" for a in schema.arguments):
            self.random_draws.append(name)
        out = func(*args, **kwargs)
        if name.startswith(("aten._to_copy", "aten.copy_", "aten._copy_from")) and _device_to_host(args, out):
            self.syncs.append(name)
        return out


def _is_tensor_type(t) -> bool:
    if isinstance(t, torch.TensorType):
        return True
    if isinstance(t, (torch.ListType, torch.OptionalType)):
        return _is_tensor_type(t.getElementType())
    if isinstance(t, torch.TupleType):
        return all(_is_tensor_type(e) for e in t.elements())
    return False


def _device_to_host(args, out) -> bool:
    sources = [a for a in args if isinstance(a, torch.Tensor)]
    if isinstance(out, torch.Tensor) and out.device.type == "cpu":
        return any(s.device.type not in ("cpu", "meta") for s in sources)
    return False
