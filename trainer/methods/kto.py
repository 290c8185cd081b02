"""Diffusion-KTO (Li et al., NeurIPS 2024): per-image binary feedback, no pairs.

With labels y (1 desirable, 0 undesirable), each image with its own timestep and noise:

    g  = e_ref - e_theta                                  # log-likelihood implemented as -MSE
    z0 = clamp(mean g over the whole batch, all ranks, min=0), detached
    h  = sigmoid((2y - 1) * beta * (g - z0))
    loss = mean(lambda_y * (1 - h))                       # lambda_d for y = 1, lambda_u for y = 0

Source: jacklishufan/diffusion-kto `train_kto_sd_v1.5.py` (commit 01c2fc3; `halo="sigmoid"`,
`kl = accelerator.reduce(g.mean().detach(), "mean").clamp(min=0)`); defaults `exps/example.sh`:
beta (`--beta_dpo`) 1000 with no 0.5 factor, lambda_d = lambda_u = 1. z0 depends on the batch
composition and is averaged over ranks with `torch.distributed` when it is initialised. Metrics:
err_w / err_l (and ref_*) are means over the desirable / undesirable images; implicit_acc is the
official `acc`; reward_margin = beta * (mean g desirable - mean g undesirable). On flow models g is the
velocity-error improvement (the KTO value function needs only a per-image log-likelihood ratio), beta scaled
as DPO's (dpo.py: 1000 -> 200).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Method, MethodConfig, StepOutputs, _required, by_prediction, rank_mean
from .dpo import FLOW_SCALE
from .registry import register


@dataclass
class KTOConfig(MethodConfig):
    beta: float = by_prediction(1000.0, 1000.0 * FLOW_SCALE)
    lambda_d: float = 1.0
    lambda_u: float = 1.0


def reference_point(g: Tensor) -> Tensor:
    """Detached batch mean of g, averaged over ranks, clamped at 0."""
    return rank_mean(g.detach().mean()).clamp(min=0.0)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


@register
class KTO(Method):
    name = "kto"
    paper = "Diffusion-KTO (Li et al., NeurIPS 2024)"
    Config = KTOConfig
    config: KTOConfig
    paired = False
    shared_noise = False

    def loss(self, out: StepOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        ref_err = _required(out.ref_err, "ref_err")
        y = out.labels.to(out.err.dtype)
        g = ref_err - out.err
        z0 = reference_point(g)
        inside = (2.0 * y - 1.0) * self.config.beta * (g - z0)
        weight = self.config.lambda_d * y + self.config.lambda_u * (1.0 - y)
        loss = (weight * (1.0 - torch.sigmoid(inside))).mean()
        g, err = g.detach(), out.err.detach()
        return loss, {
            "loss": loss.detach(),
            "implicit_acc": (inside.detach() > 0).float().mean(),
            "reward_margin": self.config.beta * (masked_mean(g, y) - masked_mean(g, 1.0 - y)),
            "z0": z0,
            "err_w": masked_mean(err, y),
            "err_l": masked_mean(err, 1.0 - y),
            "ref_err_w": masked_mean(ref_err, y),
            "ref_err_l": masked_mean(ref_err, 1.0 - y),
        }
