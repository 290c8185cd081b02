"""Errors in the U-Net's noise-conditioned perceptual space (NCP, Gambashidze et al. 2024).

Official code: sakharok13/Aligning-Stable-Diffusion-with-Noise-Conditioned-Perception,
`src/train/train_sd15.py` (`--timestep t-1`, the default) and `model_utils.get_unet_middle_states`.
From the shared x_t, one DDPM posterior step to t' = max(t-1, 0) is taken three times, with the
policy's, the reference's and the true noise as the model output, all with the same variance noise;
the frozen pretrained encoder (here: the same U-Net with the adapter off, down blocks only) embeds
each, and e = mean((E(x_hat) - E(x_true))^2) per sample.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .forward_process import Schedule, per_sample
from .models.backend import Backend, Cond


def posterior_step(alphas_cumprod: Tensor, x_t: Tensor, eps: Tensor, t: Tensor, variance_noise: Tensor) -> Tensor:
    """DDPM ancestral step x_t -> x_{t-1} given predicted noise (no noise added at t = 0)."""
    a_t = per_sample(alphas_cumprod[t], x_t)
    a_prev = per_sample(torch.where(t > 0, alphas_cumprod[(t - 1).clamp(min=0)], torch.ones_like(alphas_cumprod[t])), x_t)
    beta = 1 - a_t / a_prev
    x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    mean = a_prev.sqrt() * beta / (1 - a_t) * x0 + (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t) * x_t
    std = ((1 - a_prev) / (1 - a_t) * beta).clamp(min=0).sqrt()
    return mean + std * variance_noise * per_sample((t > 0).float(), x_t)


def ncp_errors(backend: Backend, x_t: Tensor, t: Tensor, cond: Cond, pred: Tensor, ref_pred: Tensor | None,
               target: Tensor, variance_noise: Tensor) -> tuple[Tensor, Tensor | None]:
    """Per-sample policy (and reference) errors in NCP feature space."""
    ac = backend.alphas_cumprod.to(x_t.device)
    schedule = Schedule(alphas_cumprod=ac)
    t_prev = (t - 1).clamp(min=0)

    def features(output: Tensor) -> Tensor:
        eps = schedule.to_epsilon(output, x_t, t, backend.prediction_type)
        return backend.encoder_features(posterior_step(ac, x_t, eps, t, variance_noise), t_prev, cond)

    with torch.no_grad():
        true = features(target)
        ref = features(ref_pred) if ref_pred is not None else None
    err = ((features(pred) - true) ** 2).mean(1)
    ref_err = ((ref - true) ** 2).mean(1) if ref is not None else None
    return err, ref_err
