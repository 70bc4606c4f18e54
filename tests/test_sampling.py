"""The schedule and the Euler step against diffusers' FlowMatchEulerDiscreteScheduler as FLUX.2 uses it."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

from fluxforge.config import SchedulerConfig
from fluxforge.errors import GenerationCancelled
from fluxforge.sampling import add_noise, denoise, empirical_mu, make_schedule, start_step

FLUX2 = dict(
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
    time_shift_type="exponential",
)


@pytest.mark.parametrize("seq,steps", [(4096, 50), (4096, 4), (1024, 28), (6144, 50), (16384, 50), (16, 2)])
def test_empirical_mu(seq, steps):
    assert empirical_mu(seq, steps) == compute_empirical_mu(seq, steps)


def reference_schedule(config: dict, steps: int, seq: int, sigmas=None):
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    base = np.linspace(1.0, 1 / steps, steps) if sigmas is None else sigmas
    scheduler.set_timesteps(sigmas=base, mu=compute_empirical_mu(seq, steps))
    return scheduler


@pytest.mark.parametrize("config", [FLUX2, {}, dict(shift=2.5)], ids=["flux2", "default", "static-shift"])
@pytest.mark.parametrize("steps,seq", [(50, 4096), (4, 4096), (28, 1024), (2, 16), (7, 6144)])
def test_schedule_matches_the_scheduler(config, steps, seq):
    ours = make_schedule(steps, seq, SchedulerConfig.from_dict(config))
    ref = reference_schedule(config, steps, seq)
    assert torch.equal(ours.sigmas, ref.sigmas) and torch.equal(ours.timesteps, ref.timesteps)


def test_published_example_schedule():
    """FLUX2_FACTS 4.4: 1024x1024, 4 steps with the FLUX.2 scheduler config."""
    ours = make_schedule(4, 4096, SchedulerConfig.from_dict(FLUX2))
    assert ours.timesteps.tolist() == pytest.approx([1000, 967.384, 908.144, 767.200], abs=1e-3)


def test_custom_sigmas():
    sigmas = [1.0, 0.6, 0.3]
    ours = make_schedule(3, 256, SchedulerConfig.from_dict(FLUX2), sigmas)
    assert torch.equal(ours.sigmas, reference_schedule(FLUX2, 3, 256, sigmas).sigmas)


@pytest.mark.parametrize(
    "steps,strength,expected",
    [(4, 0.3, 2), (28, 0.35, 10), (50, 0.8, 40), (4, 1.0, 4), (5, 0.6, 3), (4, 1e-9, 1)],
)
def test_start_step_keeps_ceil_of_strength_steps(steps, strength, expected):
    assert steps - start_step(steps, strength) == expected


def test_euler_loop_and_add_noise_match_the_scheduler():
    config = SchedulerConfig.from_dict(FLUX2)
    schedule = make_schedule(4, 64, config)
    ref = reference_schedule(FLUX2, 4, 64)  # no begin index yet: scale_noise looks sigma up by timestep
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 64, 8, generator=gen), torch.randn(2, 64, 8, generator=gen)
    assert torch.equal(
        add_noise(x0, noise, schedule.sigmas[1]), ref.scale_noise(x0, ref.timesteps[1:2], noise)
    )

    def velocity(x, t, i):  # any deterministic function of the inputs
        return torch.tanh(x * 1.3 + t[:, None, None])

    ours = denoise(velocity, noise, schedule)
    ref.set_begin_index(0)
    x = noise
    for i, t in enumerate(ref.timesteps):
        x = ref.step(velocity(x, t.expand(2).to(x.dtype) / 1000, i), t, x, return_dict=False)[0]
    assert torch.equal(ours, x)


def test_on_step_reports_progress_and_the_clean_estimate():
    schedule = make_schedule(3, 16, SchedulerConfig())
    seen = []
    denoise(lambda x, t, i: x * 0 + 1, torch.zeros(1, 16, 4), schedule, start=1, on_step=seen.append)
    assert [(s.step, s.total) for s in seen] == [(1, 2), (2, 2)]
    # With a constant velocity v = noise - x0 = 1, the clean estimate is x - sigma.
    assert torch.allclose(seen[0].denoised, torch.zeros(1, 16, 4) - schedule.sigmas[1])


def test_cancel_stops_at_the_next_step():
    schedule = make_schedule(5, 16, SchedulerConfig())
    cancel = threading.Event()
    calls = []

    def velocity(x, t, i):
        calls.append(i)
        if i == 1:
            cancel.set()
        return x

    with pytest.raises(GenerationCancelled, match="cancelled after 2 of 5 steps"):
        denoise(velocity, torch.zeros(1, 4, 4), schedule, cancel=cancel)
    assert calls == [0, 1]
