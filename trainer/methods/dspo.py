"""DSPO, direct score preference optimization (Zhu, Xiao, Honavar, ICLR 2025).

Source: the official code, huaishengzhu/DSPO `train.py` (commit 20867cf, the loss block after
`scale_term = -0.5 * args.beta_dpo`); defaults from `launchers/{sd15,sdxl}.sh`. With the Diffusion-DPO
inside term and the chosen half's predictions:

    inside = -(beta/2) * ((e_theta_w - e_theta_l) - (e_ref_w - e_ref_l))
    s      = sigmoid(inside)                         # not detached
    d      = pred_w - ref_pred_w                     # elementwise
    sd15:  loss = mean(((pred_w - target_w) - beta * (1 - s) * d)^2)                  beta 0.001
    sdxl:  loss = mean(((1 - s) * d)^2) if mean(d^2) >= sdxl_threshold (0.1)
           else mean((1 - s)^2)                                                     beta 5000

beta enters twice in sd15 (inside the sigmoid and as the tilt), so its value must stay ~1e-3; it is
chosen from `variant` unless set. The sdxl switch is on the batch mean of d^2, as in the code, and is
taken with `torch.where` (no host sync).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import PREDICTIONS, Method, MethodConfig, StepOutputs, _required, check_choice
from .dpo import error_metrics
from .registry import register

DEFAULT_BETA = {"sd15": 0.001, "sdxl": 5000.0}


@dataclass
class DSPOConfig(MethodConfig):
    variant: str = "sd15"
    beta: float | None = None  # None: 0.001 for sd15, 5000 for sdxl
    sdxl_threshold: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("variant", self.variant, tuple(DEFAULT_BETA))
        if self.beta is None:
            self.beta = DEFAULT_BETA[self.variant]
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)):
            raise ValueError(f"method_args.beta: expected a number, got {self.beta!r}")
        self.beta = float(self.beta)


@register
class DSPO(Method):
    name = "dspo"
    paper = "DSPO (Zhu et al., ICLR 2025)"
    Config = DSPOConfig
    config: DSPOConfig
    needs = frozenset({PREDICTIONS})
    prediction_types = frozenset({"epsilon", "v_prediction"})
    flow_refusal = ("DSPO tilts the score-matching target by the policy-reference score difference with constants "
                    "(beta 0.001 / 5000, threshold 0.1) fitted to epsilon predictions of SD1.5/SDXL; a velocity is an "
                    "affine map of the score with a timestep-dependent factor, and no flow form is published. Use dpo "
                    "on flow models")

    def loss(self, out: StepOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        beta = self.config.beta
        inside = -0.5 * beta * ((out.err_w - out.err_l) - (out.ref_err_w - out.ref_err_l))
        pred_w = out.chosen(_required(out.pred, "pred"))
        d = pred_w - out.chosen(_required(out.ref_pred, "ref_pred"))
        keep = (1.0 - torch.sigmoid(inside)).view(-1, *([1] * (d.dim() - 1)))
        if self.config.variant == "sd15":
            residual = pred_w - out.chosen(_required(out.target, "target"))
            loss = (residual - beta * keep * d).pow(2).mean()
        else:
            large = d.detach().pow(2).mean() >= self.config.sdxl_threshold
            loss = torch.where(large, (keep * d).pow(2).mean(), keep.pow(2).mean())
        inside = inside.detach()
        return loss, {
            "loss": loss.detach(),
            "implicit_acc": (inside > 0).float().mean(),
            "reward_margin": inside.mean(),
            **error_metrics(out),
        }
