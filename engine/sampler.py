"""The denoising loop shared by every variant (PIPELINE.md §10-§12, §14, §16).

:func:`sample` is a small pure function ``(velocity_fn, video, audio, config, ...) -> (video, audio)``
in the style of k-diffusion's samplers. The model is hidden behind ``velocity_fn``, so the same
loop drives the DiT, a fake model in the parity fixtures, or a compiled/TensorRT backend.

Step dispatch (fixtures/upstream/README.md §3.2):

=================================  ===================  ==============================
mode                               video                audio
=================================  ===================  ==============================
distilled (cfg 1, base stage)      step_ddim            step_ddim (also in A2V, §17.6)
SDE flag, base stage               step_sde             step_sde unless A2V
SDE flag or not, SR stage          UniPC                never stepped
otherwise (base, UniPC)            UniPC                UniPC unless A2V
=================================  ===================  ==============================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from engine.api import CancelledError
from engine.schedules import (
    DEFAULT_SHIFT,
    flow_timesteps,
    sde_theta,
    step_ddim,
    step_sde,
    unipc_scheduler,
    video_guidance_scale,
)

VelocityFn = Callable[[torch.Tensor, torch.Tensor, int, bool], tuple[torch.Tensor, torch.Tensor]]
"""``(video [1,C,T,H,W], audio [1,A,64], timestep, conditional) -> (v_video, v_audio)``."""

NoiseFn = Callable[[torch.Tensor, str], torch.Tensor]
"""``(like, which) -> standard normal tensor shaped like ``like``; ``which`` is "video"/"audio"."""


@dataclass(frozen=True)
class SamplerConfig:
    """Sampling knobs of one stage (PIPELINE.md §2.1, §11, §12).

    Attributes:
        num_steps: denoising steps (8 distilled, 32 base, 5 SR).
        shift: flow sigma shift (5.0 everywhere).
        cfg_number: 1 = one conditional call per step; 2 = conditional + unconditional (CFG).
        stage: ``base`` or ``sr`` (SR: UniPC video only, audio kept, cfg trick).
        video_guidance_high, video_guidance_low: base video CFG scale while ``t > 500`` / after.
        audio_guidance: audio CFG scale (all steps).
        sr_video_guidance: SR video CFG scale.
        use_cfg_trick, cfg_trick_start_frame, cfg_trick_value: SR: ``min(value, scale)`` for
            latent frames before ``start_frame`` (§11.3).
        a2v: audio-to-video; the provided audio latent is the condition.
        keep_audio_clean: our named deviation for distilled A2V: do not re-noise/step the
            provided audio (the reference re-noises it, §17.6). Default False = reference.
        sde: ``using_sde_flag`` (§10.5).
    """

    num_steps: int = 8
    shift: float = DEFAULT_SHIFT
    cfg_number: int = 1
    stage: Literal["base", "sr"] = "base"
    video_guidance_high: float = 5.0
    video_guidance_low: float = 2.0
    audio_guidance: float = 5.0
    sr_video_guidance: float = 3.5
    use_cfg_trick: bool = True
    cfg_trick_start_frame: int = 13
    cfg_trick_value: float = 2.0
    a2v: bool = False
    keep_audio_clean: bool = False
    sde: bool = False

    def __post_init__(self):
        if self.cfg_number not in (1, 2):
            raise ValueError(f"cfg_number must be 1 or 2, got {self.cfg_number}")
        if self.stage not in ("base", "sr"):
            raise ValueError(f"stage must be 'base' or 'sr', got {self.stage!r}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")

    @property
    def distilled(self) -> bool:
        return self.cfg_number == 1 and self.stage == "base"


DISTILL = SamplerConfig(num_steps=8, cfg_number=1)
"""The distilled 8-step, no-CFG configuration (PIPELINE.md §12)."""
BASE = SamplerConfig(num_steps=32, cfg_number=2)
"""The base 32-step UniPC configuration with CFG (PIPELINE.md §2.4)."""
SR = SamplerConfig(num_steps=5, cfg_number=1, stage="sr")
"""The SR stage as the example configs run it (5 UniPC steps, ``sr_cfg_number`` 1, §14)."""


def generator_noise(generator: torch.Generator | None) -> NoiseFn:
    """A :data:`NoiseFn` drawing ``randn`` from ``generator`` on the tensor's device and dtype fp32."""

    def draw(like: torch.Tensor, which: str) -> torch.Tensor:
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=torch.float32)

    return draw


def _overwrite_first_frame(video: torch.Tensor, image_latent: torch.Tensor | None) -> torch.Tensor:
    if image_latent is not None:
        video = video.clone()
        video[:, :, :1] = image_latent[:, :, :1].to(video)
    return video


def _video_scale(config: SamplerConfig, timestep: int, latent_frames: int, device) -> float | torch.Tensor:
    if config.stage == "sr":
        scale = torch.full((1, 1, latent_frames, 1, 1), config.sr_video_guidance, device=device)
        if config.use_cfg_trick:
            trick = min(config.cfg_trick_value, config.sr_video_guidance)
            scale[:, :, : config.cfg_trick_start_frame] = trick
        return scale
    return video_guidance_scale(timestep, config.video_guidance_high, config.video_guidance_low)


def sample(
    velocity_fn: VelocityFn,
    video: torch.Tensor,
    audio: torch.Tensor,
    config: SamplerConfig,
    *,
    image_latent: torch.Tensor | None = None,
    noise_fn: NoiseFn | None = None,
    cancel=None,
    on_step: Callable[[int, dict], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one denoising stage (PIPELINE.md §16).

    Args:
        velocity_fn: the model (see :data:`VelocityFn`).
        video: fp32 ``[1, C, T, H, W]`` initial video latent (noise, or re-noised SR input).
        audio: fp32 ``[1, A, 64]`` initial audio latent (noise, encoded audio in A2V, or the
            fixed SR audio context).
        config: :class:`SamplerConfig`.
        image_latent: fp32 ``[1, C, 1, H, W]``; overwrites latent frame 0 before every step and
            after the last (§7).
        noise_fn: source of the fresh Gaussian draws of the distilled/SDE steps (video then
            audio at every step, §4.3); default: the global torch RNG.
        cancel: optional ``threading.Event``; checked before every step.
        on_step: called after every step with ``(k, info)``; ``info`` holds ``timestep``,
            ``model_input`` (video after the frame overwrite), ``v_video``, ``v_audio``,
            ``video``, ``audio``.

    Returns:
        (video, audio): fp32 final latents (frame 0 overwritten again in TI2V).

    Raises:
        CancelledError: ``cancel`` was set.
    """
    noise_fn = noise_fn or generator_noise(None)
    timesteps, sigmas = flow_timesteps(config.num_steps, config.shift)
    sched_video = sched_audio = None
    if not config.distilled and not (config.sde and config.stage == "base"):
        sched_video = unipc_scheduler(config.num_steps, config.shift)
        sched_audio = unipc_scheduler(config.num_steps, config.shift)
    step_audio = config.stage == "base" and not (config.a2v and (not config.distilled or config.keep_audio_clean))
    for k, t in enumerate(timesteps.tolist()):
        if cancel is not None and cancel.is_set():
            raise CancelledError(f"cancelled before step {k}")
        video = _overwrite_first_frame(video, image_latent)
        v_video, v_audio = velocity_fn(video, audio, t, True)
        if config.cfg_number == 2:
            u_video, u_audio = velocity_fn(video, audio, t, False)
            scale = _video_scale(config, t, video.shape[2], video.device)
            v_video = u_video + scale * (v_video - u_video)
            v_audio = u_audio + config.audio_guidance * (v_audio - u_audio)
        model_input = video
        sigma, sigma_next = sigmas[k], sigmas[k + 1]
        if config.distilled:
            noise_v = noise_fn(video, "video")
            noise_a = noise_fn(audio, "audio")
            video = step_ddim(v_video, video, sigma, sigma_next, noise_v)
            if step_audio:
                audio = step_ddim(v_audio, audio, sigma, sigma_next, noise_a)
        elif config.sde and config.stage == "base":
            theta = sde_theta(k, config.num_steps)
            noise_v = noise_fn(video, "video")
            noise_a = noise_fn(audio, "audio")
            video = step_sde(v_video, video, sigma, sigma_next, noise_v, theta)
            if step_audio:
                audio = step_sde(v_audio, audio, sigma, sigma_next, noise_a, theta)
        else:
            video = sched_video.step(v_video, t, video).prev_sample
            if step_audio:
                audio = sched_audio.step(v_audio, t, audio).prev_sample
        if on_step is not None:
            on_step(k, {"timestep": t, "model_input": model_input, "v_video": v_video,
                        "v_audio": v_audio, "video": video, "audio": audio})
    return _overwrite_first_frame(video, image_latent), audio


SR_NOISE_VALUE = 220  # EvaluationConfig.noise_value, PIPELINE.md §2.1
SR_AUDIO_NOISE_SCALE = 0.7  # sr_audio_noise_scale


def prepare_sr_inputs(
    base_video: torch.Tensor,
    base_audio: torch.Tensor,
    latent_height: int,
    latent_width: int,
    noise_fn: NoiseFn,
    *,
    noise_value: int = SR_NOISE_VALUE,
    audio_noise_scale: float = SR_AUDIO_NOISE_SCALE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of the latent super-resolution stage (PIPELINE.md §14 steps 3-5).

    Args:
        base_video: fp32 ``[1, C, T, h, w]`` base-stage video latent.
        base_audio: fp32 ``[1, A, 64]`` base-stage (clean) audio latent.
        latent_height, latent_width: SR latent size ``(h_sr, w_sr)``.
        noise_fn: Gaussian draws, consumed as: video noise (if ``noise_value != 0``), then audio.
        noise_value: index into :func:`engine.schedules.sr_signal_table` (0 skips re-noising).
        audio_noise_scale: weight of fresh noise in the fixed SR audio context.

    Returns:
        (sr_video, sr_audio): ``z·S + ε·sqrt(1 − S²)`` of the trilinear (align_corners) upsample,
        and ``0.7 ε + 0.3 a_base``, fp32.

    Raises:
        ValueError: ``noise_value`` outside [0, 999].
    """
    from engine.schedules import sr_signal_table

    if not 0 <= noise_value <= 999:
        raise ValueError(f"noise_value must be in [0, 999], got {noise_value}")
    video = torch.nn.functional.interpolate(
        base_video.float(), size=(base_video.shape[2], latent_height, latent_width),
        mode="trilinear", align_corners=True,
    )
    if noise_value != 0:
        signal = sr_signal_table()[noise_value]
        video = video * signal + noise_fn(video, "video") * torch.sqrt(1 - signal**2)
    audio = noise_fn(base_audio, "audio") * audio_noise_scale + base_audio * (1 - audio_noise_scale)
    return video, audio
