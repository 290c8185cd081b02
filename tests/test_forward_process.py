"""The one forward process: x_t and targets equal the diffusers schedulers' own for every family; timestep
sampling follows diffusers' SD3/Flux training density draw for draw."""
from __future__ import annotations

import pytest
import torch

from trainer.forward_process import Schedule, TimestepSampling


def ddpm_scheduler(prediction_type: str):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type=prediction_type)


def flow_scheduler(family: str):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if family == "sd3":  # stabilityai/stable-diffusion-3.5-medium scheduler_config.json
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    # black-forest-labs/FLUX.1-dev scheduler_config.json: the shift is dynamic, so training sigmas are unshifted
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g), torch.tensor([0, 1, 500, 999])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_families_match_ddpm_scheduler(prediction_type):
    scheduler = ddpm_scheduler(prediction_type)
    schedule = Schedule.from_scheduler(scheduler)
    x0, noise, t = tensors()
    x_t = schedule.add_noise(x0, noise, t)
    torch.testing.assert_close(x_t, scheduler.add_noise(x0, noise, t))
    want = noise if prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
    torch.testing.assert_close(schedule.target(x0, noise, t, prediction_type), want)
    # the output that denoises x_t exactly is the target; as predicted noise it is the true noise
    out = schedule.output_from_x0(x_t, x0, t, prediction_type)
    torch.testing.assert_close(out, want, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(schedule.to_epsilon(want, x_t, t, prediction_type), noise, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_families_match_flow_match_scheduler(family):
    scheduler = flow_scheduler(family)
    schedule = Schedule.from_scheduler(scheduler)
    assert schedule.flow and schedule.num_train_timesteps == 1000
    x0, noise, t = tensors(1)
    # diffusers addresses the table in sampling order: our t is its index T - 1 - t
    model_timesteps = scheduler.timesteps[999 - t]
    x_t = schedule.add_noise(x0, noise, t)
    torch.testing.assert_close(x_t, scheduler.scale_noise(x0, model_timesteps, noise))
    torch.testing.assert_close(schedule.target(x0, noise, t, "flow"), noise - x0)
    torch.testing.assert_close(schedule.sigma(t) * 1000, model_timesteps)  # SD3's transformer timestep
    shift = 3.0 if family == "sd3" else 1.0
    u = (t + 1).double() / 1000
    torch.testing.assert_close(schedule.sigma(t).double(), shift * u / (1 + (shift - 1) * u), atol=1e-6, rtol=0)
    torch.testing.assert_close(schedule.output_from_x0(x_t, x0, t, "flow"), noise - x0, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("scheme", ["logit_normal", "mode"])
def test_flow_timestep_sampling_is_diffusers_density(scheme):
    """Same generator, same draws: t = T - 1 - floor(u T) with diffusers' u (train_dreambooth_lora_sd3.py)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    sampling = TimestepSampling(1000, scheme)
    ours = sampling.sample(4096, torch.Generator().manual_seed(7))
    u = compute_density_for_timestep_sampling(scheme, 4096, logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                                              generator=torch.Generator().manual_seed(7))
    indices = (u * 1000).long()
    assert torch.equal(ours, 999 - indices)
    assert ours.min() >= 0 and ours.max() <= 999


def test_uniform_sampling_is_the_ddpm_draw():
    """SD1.5/SDXL runs draw exactly what they drew before the forward process existed."""
    ours = TimestepSampling(1000).sample(64, torch.Generator().manual_seed(3))
    assert torch.equal(ours, torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3)))


def test_logit_normal_concentrates_on_the_middle_of_the_schedule():
    t = TimestepSampling(1000, "logit_normal").sample(20000, torch.Generator().manual_seed(0)).float()
    # sigmoid(N(0, 1)) has its median at 0.5 and 68% of its mass in (0.269, 0.731)
    assert abs(t.median().item() - 499.5) < 15
    inside = ((t > 268) & (t < 731)).float().mean().item()
    assert 0.66 < inside < 0.70


def test_bad_scheme_names_the_config_key():
    with pytest.raises(ValueError, match="timestep_sampling.*'cosine' is not one of uniform, logit_normal, mode"):
        TimestepSampling(1000, "cosine")
