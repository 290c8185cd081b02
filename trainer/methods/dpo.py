"""Diffusion-DPO (Wallace et al., CVPR 2024, arXiv 2311.12908).

With the implicit reward of an image h = e_ref - e_theta (it is positive when the policy denoises the
image better than the reference) and logits = h_w - h_l per pair:

    sigmoid: loss = mean(-log sigmoid(beta/2 * logits))      # mean OUTSIDE the log-sigmoid
    hinge:   loss = mean(relu(1 - beta/2 * logits))
    ipo:     loss = mean((logits - 1/beta)^2)

Source: SalesforceAIResearch/DiffusionDPO `train.py` (`scale_term = -0.5 * beta_dpo`; beta 5000 for
SD1.5 and SDXL in `launchers/`). `hinge`/`ipo` are the forms of diffusers
`examples/research_projects/diffusion_dpo/train_diffusion_dpo.py`, whose beta (default 2500, no 0.5)
is our beta/2. Convention: official, beta 5000 with the 0.5 factor (multiplier 2500 on the error
margin); at policy == reference the sigmoid loss is ln 2.

Guardrails (`safeguard`, `adaptive_beta`, `sft_weight`): guardrails.py.

`space = "ncp"` asks the loop for errors in the noise-conditioned perception space (NCP-DPO,
Gambashidze et al. 2024, sakharok13/Aligning-Stable-Diffusion-with-Noise-Conditioned-Perception
`src/train/train_sd15.py`); that code has no 0.5 factor and beta 2500, i.e. the same multiplier.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from .base import StepOutputs, check_choice
from .guardrails import GuardrailConfig, Guarded
from .registry import register

SPACES = ("latent", "ncp")


@dataclass
class DPOConfig(GuardrailConfig):
    beta: float = 5000.0
    loss_type: str = "sigmoid"
    space: str = "latent"

    def __post_init__(self) -> None:
        check_choice("loss_type", self.loss_type, ("sigmoid", "hinge", "ipo"))
        check_choice("space", self.space, SPACES)


def error_metrics(out: StepOutputs) -> dict[str, Tensor]:
    """Mean errors of each half (and of the reference when it ran), detached; `win_err_rose` is 1 when the
    chosen images' mean error is above the reference's (its mean over logged steps: the share of such steps)."""
    metrics = {"err_w": out.err_w.detach().mean(), "err_l": out.err_l.detach().mean()}
    if out.ref_err is not None:
        metrics["ref_err_w"] = out.ref_err_w.mean()
        metrics["ref_err_l"] = out.ref_err_l.mean()
        metrics["win_err_rose"] = (metrics["err_w"] > metrics["ref_err_w"]).float()
    return metrics


@register
class DPO(Guarded):
    name = "dpo"
    paper = "Diffusion-DPO (Wallace et al., CVPR 2024)"
    Config = DPOConfig
    config: DPOConfig

    def implicit_rewards(self, out: StepOutputs) -> tuple[Tensor, Tensor]:
        """h = e_ref - e_theta of the chosen and rejected halves."""
        return out.ref_err_w - out.err_w, out.ref_err_l - out.err_l

    def loss(self, out: StepOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        out, beta = self.guardrails.begin(out, self.config.beta)
        h_w, h_l = self.implicit_rewards(out)
        logits = h_w - h_l
        inside = 0.5 * beta * logits
        if self.config.loss_type == "sigmoid":
            losses = -F.logsigmoid(inside)
        elif self.config.loss_type == "hinge":
            losses = F.relu(1.0 - inside)
        else:
            losses = (logits - 1.0 / beta) ** 2
        loss = losses.mean()
        inside = inside.detach()
        return self.guardrails.finish(loss, {
            "loss": loss.detach(),
            "implicit_acc": (inside > 0).float().mean(),
            "reward_margin": inside.mean(),
            **error_metrics(out),
        }, out)
