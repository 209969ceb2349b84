"""Flow-matching schedules and step rules (PIPELINE.md §10, §14.4).

* :func:`flow_timesteps` builds the upstream sigma/timestep grid (§10.1).
* :func:`unipc_scheduler` returns diffusers' ``UniPCMultistepScheduler`` (bh2, order 2, flow
  prediction) with that grid injected: diffusers implements the same UniPC update equations,
  only its own grid differs, so overwriting ``sigmas``/``timesteps`` reproduces the reference
  bit for bit (§10.2).
* :func:`step_ddim` is the distilled model's re-noising step (§10.3), :func:`step_sde` the
  stochastic variant behind ``using_sde_flag`` (§10.5).
* :func:`sr_signal_table` is the zero-terminal-SNR table of the SR re-noise (§14.4).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler

SIGMA_MAX = float(np.float32(0.999))  # 0.9990000128746033, §10.1
NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_SHIFT = 5.0
GUIDANCE_SWITCH_T = 500  # video guidance 5.0 while t > 500, else 2.0 (§11.2)


def flow_timesteps(num_steps: int, shift: float = DEFAULT_SHIFT) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream ``FlowUniPCMultistepScheduler.set_timesteps`` grid (PIPELINE.md §10.1).

    Returns:
        timesteps: int64 ``[N]`` = ``trunc(1000 * sigma_k)``.
        sigmas: float32 ``[N + 1]`` = shifted ``linspace(0.999, 0, N + 1)[:N]`` then 0.

    Raises:
        ValueError: ``num_steps < 1`` or ``shift <= 0``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    base = np.linspace(SIGMA_MAX, 0.0, num_steps + 1)[:num_steps]  # float64
    shifted = shift * base / (1 + (shift - 1) * base)
    timesteps = torch.from_numpy((shifted * NUM_TRAIN_TIMESTEPS).astype(np.int64))
    sigmas = torch.from_numpy(np.concatenate([shifted, [0.0]]).astype(np.float32))
    return timesteps, sigmas


def unipc_scheduler(num_steps: int, shift: float = DEFAULT_SHIFT) -> UniPCMultistepScheduler:
    """A diffusers UniPC scheduler (bh2, order 2, flow prediction, predict x0, lower-order final,
    final sigma 0) set to ``num_steps`` on the upstream grid (PIPELINE.md §10.2)."""
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        solver_order=2,
        prediction_type="flow_prediction",
        predict_x0=True,
        solver_type="bh2",
        lower_order_final=True,
        disable_corrector=[],
        final_sigmas_type="zero",
        use_flow_sigmas=True,
        flow_shift=shift,
    )
    scheduler.set_timesteps(num_steps)
    timesteps, sigmas = flow_timesteps(num_steps, shift)
    scheduler.timesteps = timesteps
    scheduler.sigmas = sigmas
    return scheduler


def step_ddim(
    velocity: torch.Tensor, sample: torch.Tensor, sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor, noise: torch.Tensor,
) -> torch.Tensor:
    """Distilled step (PIPELINE.md §10.3): ``x0 = x - sigma v``; ``x' = sigma' eps + (1 - sigma') x0``."""
    x0 = sample - sigma * velocity
    return sigma_next * noise + (1 - sigma_next) * x0


def sde_theta(step: int, num_steps: int) -> float:
    """SDE noise switch (fixtures README §3.2): odd-numbered steps during the first 3/4, then every third."""
    if step < int(num_steps * 3 / 4):
        return 1.0 if (step + 1) % 2 == 0 else 0.0
    return 1.0 if step % 3 == 0 else 0.0


def step_sde(
    velocity: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
    noise: torch.Tensor, theta: float,
) -> torch.Tensor:
    """SDE step (PIPELINE.md §10.5): ``(1 - s' + s' c)(x - s v) + s' c v + s' sin(theta pi/2) eps``
    with ``c = cos(theta pi / 2)`` in float32 (``cos(pi/2) = -4.37e-8``)."""
    angle = torch.tensor(theta * math.pi / 2, dtype=torch.float32)
    c, sn = torch.cos(angle), torch.sin(angle)
    x0 = sample - sigma * velocity
    return (1 - sigma_next + sigma_next * c) * x0 + sigma_next * c * velocity + sigma_next * sn * noise


def sr_signal_table() -> torch.Tensor:
    """Zero-terminal-SNR DDPM signal coefficients ``S[0..999]`` float32 (PIPELINE.md §14.4).

    ``S[220] = 0.83891040`` is the default SR re-noise level; ``S[999] = 0``.
    """
    i = np.arange(1000, dtype=np.float64)
    betas = (math.sqrt(0.00085) + i * (math.sqrt(0.012) - math.sqrt(0.00085)) / 999) ** 2
    alphas_bar = np.cumprod(1 - betas)
    a = torch.from_numpy(alphas_bar.astype(np.float32)).sqrt()
    a0, a_last = a[0].clone(), a[-1].clone()
    return (a - a_last) * a0 / (a0 - a_last)


def video_guidance_scale(timestep: int, high: float = 5.0, low: float = 2.0) -> float:
    """Base-stage video CFG scale: ``high`` while ``t > 500``, else ``low`` (PIPELINE.md §11.2)."""
    return high if timestep > GUIDANCE_SWITCH_T else low
