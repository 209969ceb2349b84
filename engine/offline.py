"""Offline clip generation exactly as the reference samples it (PIPELINE.md §1 step 3, §16),
for ``avatar-server generate``: base stage (distilled 8 steps, or 32 UniPC steps with CFG
against the negative prompt), optional latent super-resolution (§14), decode and mux.

Unlike the streaming engine (:mod:`engine.pipeline`) nothing is trimmed or re-timed here: a 5 s
request gives 125 frames and ``1764 * 126`` audio samples at 44.1 kHz (5.04 s, §15.2).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from engine.api import VIDEO_FPS, EngineInputError
from engine.dit import DiTModel
from engine.geometry import SegmentGeometry, check_resolution
from engine.runner import DiTRunner
from engine.sampler import BASE, DISTILL, SR, SamplerConfig, generator_noise, prepare_sr_inputs, sample

logger = logging.getLogger(__name__)

RESOLUTIONS = {
    # name: (base width, base height, SR width, SR height) - the example scripts' sizes (PIPELINE.md §2.5)
    "256p": (448, 256, None, None),
    "540p": (448, 256, 896, 512),
    "1080p": (448, 256, 1920, 1088),
}
MAX_SECONDS = 20.0
Variant = Literal["distill", "base"]


@dataclass
class ClipRequest:
    """One offline clip.

    Attributes:
        prompt: enhanced prompt text.
        seconds: clip length in seconds (``0 < seconds <= 20``; A2V: at most the audio length).
        width, height: base-stage size in pixels (multiples of 32).
        sr_width, sr_height: SR size (multiples of 32) or None for no SR stage.
        image: uint8 ``[H, W, 3]`` reference image (TI2V) or None (T2V).
        audio: float32 mono waveform ``[N]`` (A2V) or None.
        audio_sample_rate: Hz of ``audio``.
        seed: RNG seed (the reference's default is 42).
        variant: ``distill`` (8 steps, no CFG) or ``base`` (32 UniPC steps, CFG).
    """

    prompt: str
    seconds: float = 4.0
    width: int = 448
    height: int = 256
    sr_width: int | None = None
    sr_height: int | None = None
    image: np.ndarray | None = None
    audio: np.ndarray | None = None
    audio_sample_rate: int = 44_100
    seed: int = 42
    variant: Variant = "distill"


@dataclass
class ClipModels:
    """The loaded stack: base DiT, optional SR DiT, codecs and text encoder on ``device``."""

    dit: DiTModel
    text_encoder: object
    video_vae: object
    audio_vae: object
    sr_dit: DiTModel | None = None
    turbo_decoder: object | None = None
    device: str = "cpu"
    compute_dtype: torch.dtype = torch.bfloat16
    keep_audio_clean: bool = False


@dataclass
class Clip:
    """Generated clip: uint8 frames ``[F, H, W, 3]`` at 25 fps and float32 stereo ``[N, 2]`` audio."""

    frames: np.ndarray
    audio: np.ndarray
    sample_rate: int
    timings_s: dict


def validate_request(request: ClipRequest, models: ClipModels) -> None:
    """Refuse what the loaded variant cannot do, naming the field and the limit.

    Raises:
        EngineInputError: sizes not multiples of 32, seconds out of (0, 20], SR size without an SR
            model, unknown variant.
    """
    check_resolution(request.width, request.height)
    for name in ("sr_width", "sr_height"):
        value = getattr(request, name)
        if value is not None:
            check_resolution(value, value, names=(name, name))
    if not 0 < request.seconds <= MAX_SECONDS:
        raise EngineInputError(f"seconds {request.seconds} outside (0, {MAX_SECONDS}]")
    if (request.sr_width is None) != (request.sr_height is None):
        raise EngineInputError("sr_width and sr_height must be given together")
    if request.sr_width is not None and models.sr_dit is None:
        raise EngineInputError("a super-resolution size needs an SR model (540p_sr or 1080p_sr checkpoint)")
    if request.variant not in ("distill", "base"):
        raise EngineInputError(f"variant {request.variant!r} must be 'distill' or 'base'")


def _stage_velocity(dit: DiTModel, contexts: dict[bool, tuple[torch.Tensor, int]], coords_style: str,
                    compute_dtype: torch.dtype, video: torch.Tensor, audio: torch.Tensor, timings: dict):
    """The stage's velocity function through :class:`engine.runner.DiTRunner`: static inputs per
    context (conditional, and unconditional for CFG), prepared once for the stage's geometry."""
    runner = DiTRunner(dit, compute_dtype=compute_dtype, coords_style=coords_style)
    inputs = {cond: runner.prepare(video.shape, audio.shape[1], features, num_text, device=video.device)
              for cond, (features, num_text) in contexts.items()}
    return runner.velocity_fn(inputs, timings, "dit")


@torch.inference_mode()
def generate_clip(models: ClipModels, request: ClipRequest, *, negative_context=None, progress: bool = True) -> Clip:
    """Generate one clip (PIPELINE.md §16), sampling as the reference does.

    Args:
        models: the loaded stack.
        request: what to generate.
        negative_context: ``(features [640, C], n)`` of the negative prompt, encoded once at start-up
            (§5); encoded here if None and the base variant needs it.
        progress: tqdm bar over denoising steps.

    Raises:
        EngineInputError: see :func:`validate_request`.
    """
    from tqdm.auto import tqdm

    from engine.codecs.image import preprocess_image

    validate_request(request, models)
    device = torch.device(models.device)
    gen = torch.Generator(device=device).manual_seed(int(request.seed))
    timings: dict[str, float] = {}
    a2v = request.audio is not None
    fps = VIDEO_FPS

    # a. audio: noise, or the posterior sample of the given audio (§4.1, §13)
    if a2v:
        waveform = np.asarray(request.audio, dtype=np.float32)[: int(request.seconds * request.audio_sample_rate)]
        audio = models.audio_vae.encode(waveform, request.audio_sample_rate, generator=gen).to(device)
    else:
        audio = torch.randn(1, round(fps * request.seconds) + 1, 64, generator=gen, device=device)
    geo = SegmentGeometry.for_audio_latents(audio.shape[1], request.width, request.height)
    h, w = geo.latent_height, geo.latent_width
    # b. video noise
    video = torch.randn(geo.latent_shape(models.dit.config.latent_channels), generator=gen, device=device)
    # c. text
    t0 = time.perf_counter()
    prompt_ctx = models.text_encoder.encode(request.prompt)
    base_cfg: SamplerConfig = DISTILL if request.variant == "distill" else BASE
    contexts = {True: prompt_ctx}
    if base_cfg.cfg_number == 2:
        if negative_context is None:
            from engine.codecs.text_encoder import NEGATIVE_PROMPT

            negative_context = models.text_encoder.encode(NEGATIVE_PROMPT)
        contexts[False] = negative_context
    contexts = {k: (f.to(device), n) for k, (f, n) in contexts.items()}
    timings["text"] = time.perf_counter() - t0
    # d. image latent at base resolution (§7)
    image_latent = None
    if request.image is not None:
        image_latent = models.video_vae.encode_image(preprocess_image(request.image, 16 * w, 16 * h)).float().to(device)

    total_steps = base_cfg.num_steps + (SR.num_steps if models.sr_dit is not None and request.sr_width else 0)
    bar = tqdm(total=total_steps, desc="denoising", disable=not progress, unit="step")
    config = dataclasses.replace(base_cfg, a2v=a2v, keep_audio_clean=models.keep_audio_clean)
    t0 = time.perf_counter()
    velocity = _stage_velocity(models.dit, contexts, "v2", models.compute_dtype, video, audio, timings)
    video, audio = sample(velocity, video, audio, config, image_latent=image_latent, noise_fn=generator_noise(gen),
                          on_step=lambda k, info: bar.update(1))
    timings["base"] = time.perf_counter() - t0

    # e. latent super-resolution (§14)
    if request.sr_width is not None:
        t0 = time.perf_counter()
        sr_geo = SegmentGeometry.for_audio_latents(audio.shape[1], request.sr_width, request.sr_height)
        h_sr, w_sr = sr_geo.latent_height, sr_geo.latent_width
        sr_image_latent = None
        if request.image is not None:
            sr_image_latent = models.video_vae.encode_image(
                preprocess_image(request.image, 16 * w_sr, 16 * h_sr)).float().to(device)
        sr_video, sr_audio = prepare_sr_inputs(video, audio, h_sr, w_sr, generator_noise(gen))
        sr_cfg = dataclasses.replace(SR, a2v=a2v)
        if sr_cfg.cfg_number == 2 and False not in contexts:
            raise EngineInputError("SR with CFG needs the negative prompt context")
        velocity = _stage_velocity(models.sr_dit, contexts, "v1", models.compute_dtype, sr_video, sr_audio, timings)
        video, _ = sample(velocity, sr_video, sr_audio, sr_cfg, image_latent=sr_image_latent, noise_fn=generator_noise(gen),
                          on_step=lambda k, info: bar.update(1))
        timings["sr"] = time.perf_counter() - t0
    bar.close()

    # f. decode (§15): video through the Turbo decoder when loaded, audio through Oobleck
    t0 = time.perf_counter()
    decoder = models.turbo_decoder or models.video_vae
    frames = decoder.decode_to_uint8(video)
    timings["decode_video"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    stereo, rate = models.audio_vae.decode(audio)
    timings["decode_audio"] = time.perf_counter() - t0
    return Clip(frames=frames, audio=np.asarray(stereo, dtype=np.float32), sample_rate=int(rate), timings_s=timings)
