"""The forward process of every model family: noising, training targets, timestep sampling.

Training timesteps are integers t in [0, T) that grow with the noise level, for every family:

- DDPM families (SD1.5, SDXL): x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps with a_t = alphas_cumprod[t]
  (Ho et al. 2020, eq. 4); the target is eps (`epsilon`) or v = sqrt(a_t) eps - sqrt(1 - a_t) x0
  (`v_prediction`, Salimans & Ho 2022, sec. 4; diffusers `DDPMScheduler.get_velocity`).
- Rectified flow (SD3/SD3.5, Flux.1): x_t = (1 - s_t) x0 + s_t eps and the target is the velocity
  eps - x0 (Esser et al. 2024, "Scaling rectified flow transformers", sec. 2, rectified flow; diffusers
  `FlowMatchEulerDiscreteScheduler.scale_noise`).
  s_t = sigmas[t] is the scheduler's own table read backwards: diffusers keeps it in sampling order,
  index i = T - 1 - t, so s_t = shift((t + 1) / T), with the scheduler's static `shift` applied unless it
  shifts dynamically per resolution (Flux.1), as `FlowMatchEulerDiscreteScheduler.__init__` does.

Timestep sampling (`TimestepSampling`): `uniform` over the T timesteps, or the densities of diffusers'
`training_utils.compute_density_for_timestep_sampling` (SD3 paper, Esser et al. 2024, sec. 3.1):
`logit_normal` u = sigmoid(N(mean, std)), `mode` u = 1 - v - scale (cos^2(pi v / 2) - 1 + v); as
diffusers' `train_dreambooth_lora_sd3.py` / `_flux.py` do, u indexes the scheduler's table in sampling
order (i = floor(u T)), so u near 1 is the noisiest timestep.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .config import TIMESTEP_SAMPLINGS

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")


def per_sample(x: Tensor, like: Tensor) -> Tensor:
    """A per-sample vector broadcast over the other dimensions of `like`, in its dtype and device."""
    return x.view(-1, *[1] * (like.dim() - 1)).to(like.device, like.dtype)


@dataclass(frozen=True)
class Schedule:
    """The noise level of each training timestep: `alphas_cumprod` (DDPM) or `sigmas` (rectified flow)."""

    alphas_cumprod: Tensor | None = None
    sigmas: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.alphas_cumprod is None) == (self.sigmas is None):
            raise ValueError("a schedule has either alphas_cumprod (DDPM) or sigmas (flow)")

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> "Schedule":
        """From a diffusers training scheduler: DDPM-style (`alphas_cumprod`) or `FlowMatchEulerDiscreteScheduler`."""
        if hasattr(scheduler, "alphas_cumprod"):
            return cls(alphas_cumprod=scheduler.alphas_cumprod.detach().float().cpu().clone())
        return cls(sigmas=scheduler.sigmas.detach().float().cpu().flip(0).clone())  # sampling order -> ascending t

    def to(self, device: torch.device) -> "Schedule":
        """This schedule with its table on `device`: indexed there every step, with no host-to-device copy (a copy
        from pageable memory would wait for the queued GPU work)."""
        return Schedule(alphas_cumprod=None if self.alphas_cumprod is None else self.alphas_cumprod.to(device),
                        sigmas=None if self.sigmas is None else self.sigmas.to(device))

    @property
    def flow(self) -> bool:
        return self.sigmas is not None

    @property
    def num_train_timesteps(self) -> int:
        table = self.sigmas if self.flow else self.alphas_cumprod
        return int(table.shape[0])

    def _alpha_bar(self, t: Tensor, like: Tensor) -> Tensor:
        return per_sample(self.alphas_cumprod.to(t.device)[t.long()], like)

    def sigma(self, t: Tensor) -> Tensor:
        """Flow: s_t per sample (the model's timestep is s_t, or s_t * T for SD3)."""
        return self.sigmas.to(t.device)[t.long()]

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t of the forward process (see the module docstring)."""
        if self.flow:
            s = per_sample(self.sigma(t), x0)
            return (1 - s) * x0 + s * noise
        a = self._alpha_bar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor, prediction_type: str) -> Tensor:
        """What the network learns to output: eps, v, or the flow velocity eps - x0."""
        if prediction_type == "flow":
            return noise - x0
        if prediction_type == "epsilon":
            return noise
        a = self._alpha_bar(t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def output_from_x0(self, x_t: Tensor, x0: Tensor, t: Tensor, prediction_type: str) -> Tensor:
        """The network output that denoises x_t to x0 (for samplers that predict x0, as ComfyUI's models do)."""
        if prediction_type == "flow":
            return (x_t - x0) / per_sample(self.sigma(t), x_t)  # x_t = x0 + s (eps - x0)
        a = self._alpha_bar(t, x_t)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        if prediction_type == "epsilon":
            return eps
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    def to_epsilon(self, output: Tensor, x_t: Tensor, t: Tensor, prediction_type: str) -> Tensor:
        """DDPM families: a network output (eps or v) as predicted noise, eps = sqrt(a) v + sqrt(1 - a) x_t."""
        if prediction_type == "epsilon":
            return output
        a = self._alpha_bar(t, x_t)
        return a.sqrt() * output + (1 - a).sqrt() * x_t


@dataclass(frozen=True)
class TimestepSampling:
    """How training timesteps are drawn (see the module docstring); defaults are diffusers'."""

    num_train_timesteps: int
    scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    def __post_init__(self) -> None:
        if self.scheme not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"config key 'timestep_sampling': {self.scheme!r} is not one of {', '.join(TIMESTEP_SAMPLINGS)}")

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """n timesteps (int64, ascending-noise convention) drawn on the CPU generator."""
        T = self.num_train_timesteps
        if self.scheme == "uniform":
            return torch.randint(0, T, (n,), generator=generator)
        if self.scheme == "logit_normal":  # compute_density_for_timestep_sampling, "logit_normal"
            u = torch.sigmoid(torch.normal(self.logit_mean, self.logit_std, (n,), generator=generator))
        else:  # "mode": f_mode of the SD3 paper, sec. 3.1 (compute_density_for_timestep_sampling, "mode")
            v = torch.rand((n,), generator=generator)
            u = 1 - v - self.mode_scale * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)
        index = (u * T).long().clamp(0, T - 1)  # index into the table in sampling order; sigmoid may round to 1
        return T - 1 - index
