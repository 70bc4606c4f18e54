"""Rectified-flow sampling: the FLUX.2 schedule and the one Euler loop every mode runs.

The forward process is x_sigma = (1 - sigma) x0 + sigma noise and the DiT predicts the velocity
v = noise - x0, so one Euler step is x <- x + (sigma_next - sigma) v and the clean estimate at any step is
x0 = x - sigma v. Schedules follow diffusers' FlowMatchEulerDiscreteScheduler as the FLUX.2 pipelines
call it: sigmas linspace(1, 1/N, N), shifted by an image-size dependent mu (exponential time shift) or a
static shift, computed in float32, with 0 appended.

Modes differ only in what the model callable sees (extra tokens, CFG, cached reference K/V), where the
loop starts on the schedule (img2img / inpainting) and an optional blend after each step (inpainting).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fluxforge.config import SchedulerConfig
from fluxforge.errors import GenerationCancelled

# The model as the loop sees it: (latents [B, S, C], timestep [B] in [0, 1], step index) -> velocity.
Velocity = Callable[[Tensor, Tensor, int], Tensor]


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """The time-shift parameter FLUX.2 fits to image size and step count. It is linear in the step count
    between fits at 10 and 200 steps, and above 4300 tokens depends on the size alone (as BFL's code)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m200, m10 = a2 * image_seq_len + b2, a1 * image_seq_len + b1
    slope = (m200 - m10) / 190.0
    return float(slope * num_steps + (m200 - 200.0 * slope))


@dataclass(frozen=True)
class Schedule:
    sigmas: Tensor  # [N + 1] float32, decreasing from about 1 to a final 0
    timesteps: Tensor  # [N] float32, sigmas[:-1] x num_train_timesteps

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]


def make_schedule(
    num_steps: int, image_seq_len: int, config: SchedulerConfig, sigmas: list[float] | None = None
) -> Schedule:
    """The shifted schedule for `num_steps` steps over `image_seq_len` noisy tokens."""
    base = np.linspace(1.0, 1 / num_steps, num_steps) if sigmas is None else sigmas
    s = np.array(base).astype(np.float32)  # numpy float32 throughout, as the reference computes it
    if config.use_dynamic_shifting:
        mu = empirical_mu(image_seq_len, num_steps)
        if config.time_shift_type == "exponential":
            s = math.exp(mu) / (math.exp(mu) + (1 / s - 1) ** 1.0)
        else:
            s = mu / (mu + (1 / s - 1) ** 1.0)
    else:
        s = config.shift * s / (1 + (config.shift - 1) * s)
    shifted = torch.from_numpy(s).to(torch.float32)
    return Schedule(torch.cat([shifted, torch.zeros(1)]), shifted * config.num_train_timesteps)


def start_step(num_steps: int, strength: float) -> int:
    """First step to run for img2img / inpainting: ceil(N x strength) steps remain (the reference's
    `int(N - N * strength)` truncation), and at least one."""
    return min(int(max(num_steps - min(num_steps * strength, num_steps), 0)), num_steps - 1)


def add_noise(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """x_sigma = sigma noise + (1 - sigma) x0, in x0's dtype."""
    sigma = sigma.to(x0.dtype)
    return sigma * noise + (1.0 - sigma) * x0


@dataclass(frozen=True)
class StepInfo:
    """What `on_step` receives after each step."""

    step: int  # 1-based index of the step just finished
    total: int  # steps this generation runs
    latents: Tensor  # [B, S, C] packed latents after the step
    denoised: Tensor  # [B, S, C] the model's current estimate of the clean latents, for previews


Blend = Callable[[Tensor, int], Tensor]  # (latents after step i, i) -> latents


def denoise(
    model: Velocity,
    x: Tensor,
    schedule: Schedule,
    *,
    start: int = 0,
    blend: Blend | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    cancel: threading.Event | None = None,
    stop: Callable[[], bool] | None = None,
) -> Tensor:
    """Euler-integrate from schedule step `start` to sigma = 0. `cancel` (an error) and `stop` (the latents
    returned as they are, the remaining steps skipped) are checked before every step."""
    total = schedule.num_steps - start
    for i in range(start, schedule.num_steps):
        if cancel is not None and cancel.is_set():
            raise GenerationCancelled(f"cancelled after {i - start} of {total} steps")
        if stop is not None and stop():
            break
        # Reproduces the reference's rounding: timestep in the latents' dtype, then / 1000.
        t = schedule.timesteps[i].expand(x.shape[0]).to(x.device, x.dtype) / 1000
        v = model(x, t, i)
        sigma, sigma_next = schedule.sigmas[i], schedule.sigmas[i + 1]
        denoised = x - sigma.to(x.dtype) * v if on_step is not None else None
        x = (x.float() + (sigma_next - sigma) * v).to(v.dtype)
        if blend is not None:
            x = blend(x, i)
        if on_step is not None:
            on_step(StepInfo(i - start + 1, total, x, denoised))
    return x
