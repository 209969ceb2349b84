"""The one engine factory: presets -> a :class:`engine.api.SegmentEngine`.

:func:`create_engine` is the only preset dispatcher (``preview``, ``testpattern``, ``full``); the
server, ``ops/`` and the tests call it. :func:`build_preview_engine` and :func:`build_full_engine`
build the two model presets; model construction itself is :func:`engine.dit.seeded_dit` (seeded
weights) or :func:`engine.stack.load_stack` (a checkpoint root).

Preset sizes and limits live here: the preview's 224x128 output, 256 text tokens and 12.8 kHz
audio VAE; the full model's 448x256 and 640 text tokens (PIPELINE.md §3, §5).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from engine.api import PREVIEW_NOTICE
from engine.dit import DiTModel, seeded_dit
from engine.geometry import SegmentGeometry
from engine.pipeline import MagiHumanEngine
from engine.runner import text_buckets_up_to

PREVIEW_WIDTH, PREVIEW_HEIGHT = 224, 128
FULL_WIDTH, FULL_HEIGHT = 448, 256  # the 256p example size (PIPELINE.md §3)
FULL_SR_SIZE = (896, 512)  # the example scripts' 540p size (PIPELINE.md §14)
FULL_TEXT_TOKENS = 640  # the model's text context (PIPELINE.md §5)

PREVIEW_TEXT_TOKENS = 256
"""The preview's byte tokenizer makes one token per UTF-8 byte (a 1,600-character enhanced prompt is
640 tokens after the reference's cap, where T5Gemma's tokenizer gives ~400); the preview keeps the
first 256 so that text does not dominate its sequence on a CPU. The real stack keeps 640."""

PREVIEW_AUDIO_MODEL_RATE_HZ = 12_800
"""Model rate of the preview's Oobleck VAE (hop 512, strides 2·2·4·4·8; still 25 latents/s). The
encoder's first stage is 128 channels wide at any size (2 x latent dim), so at the released 51.2 kHz
encoding the user's audio took about as long as the whole rest of a lip-sync segment on 2 CPU
cores; at 12.8 kHz it is a quarter of the work. The real stack keeps 51.2 kHz (hop 2048)."""

PRESETS = ("preview", "testpattern", "full")

TextBuckets = Sequence[int] | None | str
"""``"auto"`` (:func:`engine.runner.text_buckets_up_to` of the preset's text limit), None (no
padding: every text length its own shape), or explicit bucket sizes."""


def default_size(preset: str) -> tuple[int, int]:
    """Output ``(width, height)`` in pixels of a model preset (``preview`` 224x128, ``full`` 448x256).

    Raises:
        ValueError: unknown preset.
    """
    if preset == "preview":
        return PREVIEW_WIDTH, PREVIEW_HEIGHT
    if preset == "full":
        return FULL_WIDTH, FULL_HEIGHT
    raise ValueError(f"preset {preset!r} has no model size; known: preview, full")


def preset_geometry(preset: str, seconds: float, width: int | None = None,
                    height: int | None = None) -> SegmentGeometry:
    """The :class:`engine.geometry.SegmentGeometry` of a ``seconds`` s segment of ``preset`` at its
    default size (:func:`default_size`) unless ``width``/``height`` are given."""
    default = default_size(preset)
    return SegmentGeometry.for_seconds(seconds, width or default[0], height or default[1])


def seeded_preset_dit(preset: str, device: str | torch.device = "cpu", seed: int = 0) -> DiTModel:
    """The DiT of a model preset with seeded, untrained weights (:func:`engine.dit.seeded_dit`).

    ``preview``: :func:`engine.config.preview_config`, drawn on the CPU (the preview engine's weights).
    ``full``: the 15 B :func:`engine.config.full_config`, drawn on ``device`` (no checkpoint needed).

    Raises:
        ValueError: unknown preset.
    """
    from engine.config import full_config, preview_config

    if preset == "full":
        return seeded_dit(full_config(), seed, device, draw_on_device=True)
    if preset == "preview":
        return seeded_dit(preview_config(), seed, device)
    raise ValueError(f"preset {preset!r} has no DiT; known: preview, full")


def _buckets(text_buckets: TextBuckets, limit: int) -> tuple[int, ...] | None:
    if text_buckets == "auto":
        return text_buckets_up_to(limit)
    if text_buckets is None:
        return None
    buckets = tuple(sorted(int(b) for b in text_buckets))
    if not buckets or buckets[0] < 1 or buckets[-1] < limit:
        raise ValueError(f"text_buckets {buckets} must be positive and reach the text limit {limit}")
    return buckets


def build_preview_engine(*, seed: int = 0, device: str = "cpu", width: int = PREVIEW_WIDTH,
                         height: int = PREVIEW_HEIGHT, compute_dtype: torch.dtype | None = None,
                         sr: bool = False, backend: str = "eager",
                         text_buckets: TextBuckets = "auto", graph_loop: bool | None = None) -> MagiHumanEngine:
    """The ``preview`` preset: the same classes at a small size with seeded, untrained weights.

    Its pictures and sounds are noise by design; the structure (shapes, rates, timing, the
    whole streaming path) is the real one. ``compute_dtype`` defaults to bf16 (the reference
    numerics, DIT.md §6; also the faster one on CPUs with bf16 dot-product units); the Oobleck
    encoder (lip-sync) runs in bf16 too, and its VAE at :data:`PREVIEW_AUDIO_MODEL_RATE_HZ`
    (12.8 kHz, hop 512) instead of 51.2 kHz (hop 2048): preview-only speed choices (the reference:
    fp32 at 51.2 kHz) that keep 25 audio latents per second. ``sr=True`` adds a seeded preview SR DiT
    that super-resolves segments to twice the size (``2 width x 2 height``). ``backend`` selects the
    DiT execution path (:func:`engine.backends.apply_backend`: eager, fast, compile, fp8, ...).
    ``text_buckets``: see :data:`TextBuckets` (default ``"auto"``: 64, 128, 256). ``graph_loop``: the
    engine's option (:class:`engine.pipeline.MagiHumanEngine`; None: on for CUDA, off elsewhere).
    """
    from engine.codecs.audio_vae import OobleckAudioVAE
    from engine.codecs.text_encoder import T5GemmaTextEncoder
    from engine.codecs.video_vae import WanVideoVAE
    from engine.config import preview_config

    config = preview_config()
    text_encoder = T5GemmaTextEncoder.preview(seed=seed, hidden_size=config.text_in_channels)
    dit = seeded_dit(config, seed, device)
    sr_dit = seeded_dit(config, seed + 1, device) if sr else None
    engine = MagiHumanEngine(
        dit, text_encoder, WanVideoVAE.preview(seed=seed).to(device),
        OobleckAudioVAE.preview(seed=seed, encode_dtype=torch.bfloat16, model_sample_rate=PREVIEW_AUDIO_MODEL_RATE_HZ),
        width=width, height=height, device=device, compute_dtype=compute_dtype or torch.bfloat16, name="preview", notice=PREVIEW_NOTICE,
        sr_dit=sr_dit, sr_size=(2 * width, 2 * height) if sr else None, max_text_tokens=PREVIEW_TEXT_TOKENS,
        text_buckets=_buckets(text_buckets, PREVIEW_TEXT_TOKENS), graph_loop=graph_loop,
    )
    return use_backend(engine, backend)


def build_full_engine(
    checkpoint_dir: str | Path,
    *,
    device: str | torch.device = "cuda",
    width: int = FULL_WIDTH,
    height: int = FULL_HEIGHT,
    compute_dtype: torch.dtype = torch.bfloat16,
    text_device: str | torch.device | None = None,
    progress: bool = True,
    sr: bool = False,
    sr_size: tuple[int, int] = FULL_SR_SIZE,
    text_buckets: TextBuckets = "auto",
    graph_loop: bool | None = None,
) -> MagiHumanEngine:
    """The streaming engine on the released stack: distilled DiT, Turbo decoder, bf16 compute.

    With ``sr=True`` the ``540p_sr`` DiT is loaded too, so that idle time super-resolves buffered
    segments to ``sr_size`` (896x512, the example scripts' 540p size; PIPELINE.md §14).

    ``keep_audio_clean=True`` (the named streaming deviation of :mod:`engine.pipeline`: lip-sync
    audio is not re-noised and is played as given).

    Args:
        checkpoint_dir: checkpoint root holding at least ``distill/``, ``turbo_vae/`` and the three
            external models.
        device: ``cuda`` in practice; ``cpu`` works (slowly).
        width, height: output size in pixels (multiples of 32; 448x256 = the example scripts).
        compute_dtype: DiT compute and codec weight dtype (bf16 reference numerics).
        text_device: device of T5Gemma (default ``device``).
        progress: loading progress bars.
        sr, sr_size: load the SR DiT, and its output size in pixels.
        text_buckets: see :data:`TextBuckets` (default ``"auto"``: 64, 128, 256, 384, 512, 640).
        graph_loop: the distilled loop as one CUDA graph per shape (:class:`engine.graphs.GraphLoop`;
            None: on for CUDA).

    Returns:
        :class:`engine.pipeline.MagiHumanEngine` named ``full``.

    Raises:
        EngineInputError: width/height not positive multiples of 32 (checked before loading).
        StackError: the root is incomplete (see :func:`engine.stack.resolve_stack`).
    """
    from engine.geometry import check_resolution
    from engine.sampler import DISTILL
    from engine.stack import load_stack

    check_resolution(width, height)
    if sr:
        check_resolution(*sr_size)
    models = load_stack(
        checkpoint_dir, variant="distill", sr="540p_sr" if sr else None, device=device, dtype=compute_dtype,
        use_turbo=True, keep_audio_clean=True, text_device=text_device, progress=progress,
    )
    return MagiHumanEngine(
        models.dit, models.text_encoder, models.video_vae, models.audio_vae,
        width=width, height=height, device=device, compute_dtype=compute_dtype, sampler=DISTILL,
        keep_audio_clean=True, video_decoder=models.turbo_decoder, name="full",
        sr_dit=models.sr_dit if sr else None, sr_size=sr_size if sr else None,
        text_buckets=_buckets(text_buckets, FULL_TEXT_TOKENS), graph_loop=graph_loop,
    )


def use_backend(engine: MagiHumanEngine, backend: str, **options) -> MagiHumanEngine:
    """Switch the engine's runners (the DiT's and the SR DiT's) to ``backend``
    (:func:`engine.backends.apply_backend` with ``options``); the DiT modules themselves are unchanged.
    Returns ``engine``."""
    from engine.backends import apply_backend

    for runner in (engine.runner, engine.sr_runner):
        if runner is not None:
            apply_backend(runner, backend, engine.device, **options)
    return engine


def create_engine(preset: str, *, checkpoint_dir: str | None = None, device: str = "cpu", seed: int = 0,
                  sr: bool = False, backend: str = "eager", testpattern_delay_s: float = 0.0,
                  text_buckets: TextBuckets = "auto", compile_cache_dir: str | Path | None = None,
                  graph_loop: bool | None = None):
    """Build a :class:`engine.api.SegmentEngine` by preset name (the one dispatcher).

    * ``preview``: :func:`build_preview_engine` (CPU friendly, seeded weights).
    * ``testpattern``: :class:`engine.testpattern.TestPatternEngine` (no model; flashes and
      clicks at known media times, for A/V sync measurements), ``generate_delay_s =
      testpattern_delay_s``.
    * ``full``: the released model stack loaded from ``checkpoint_dir``
      (:func:`build_full_engine`); requires a GPU in practice.

    Args:
        preset: one of :data:`PRESETS`.
        checkpoint_dir: ``full`` only: the checkpoint root.
        device: torch device of the model presets.
        seed: preview weight seed.
        sr: also load a super-resolution DiT (:meth:`MagiHumanEngine.super_resolve`).
        backend: DiT execution backend (:data:`engine.backends.BACKEND_NAMES`, ``+`` combinations).
        testpattern_delay_s: ``testpattern`` only: seconds each ``generate`` waits.
        text_buckets: see :data:`TextBuckets` (default ``"auto"``: static shapes, issue 17).
        compile_cache_dir: keep ``torch.compile``'s caches there
            (:func:`engine.backends.compile.set_compile_cache_dir`), e.g. a persistent volume.
        graph_loop: model presets: the distilled loop as one CUDA graph per shape
            (:class:`engine.graphs.GraphLoop`); None: on for CUDA, off elsewhere.

    After building, a server calls :meth:`engine.pipeline.MagiHumanEngine.warm_up` with the segment
    lengths its planner can ask for, before reporting ready.

    Raises:
        ValueError: unknown preset, or ``full`` without ``checkpoint_dir``.
    """
    if compile_cache_dir is not None:
        from engine.backends.compile import set_compile_cache_dir

        set_compile_cache_dir(compile_cache_dir)
    if preset == "preview":
        return build_preview_engine(seed=seed, device=device, sr=sr, backend=backend, text_buckets=text_buckets,
                                    graph_loop=graph_loop)
    if preset == "testpattern":
        from engine.testpattern import TestPatternEngine

        return TestPatternEngine(generate_delay_s=testpattern_delay_s)
    if preset == "full":
        if not checkpoint_dir:
            raise ValueError("preset 'full' needs checkpoint_dir (the released daVinci-MagiHuman stack)")
        return use_backend(build_full_engine(checkpoint_dir, device=device, sr=sr, text_buckets=text_buckets,
                                             graph_loop=graph_loop), backend)
    raise ValueError(f"unknown engine preset {preset!r}; known: {', '.join(PRESETS)}")
