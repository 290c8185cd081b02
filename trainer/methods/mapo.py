"""MaPO, margin-aware preference optimization (Hong et al. 2024, arXiv 2406.06424). Reference-free.

    g(e)     = s*e / (exp(s*e) - 1)              # s = snr_value, a constant; g in (0, 1]
    log_odds = g(e_theta_w) - g(e_theta_l)
    loss     = mean(e_theta_w) - beta * mean(log sigmoid(T * log_odds))

Source: mapo-t2i/mapo `utils.py::compute_loss` (T = `noise_scheduler.config.num_train_timesteps`);
defaults `args.py`: beta_mapo 0.1, snr_value 0.5. `expm1` replaces `exp - 1` (errors are > 0).
Logged like the authors: win_score = mean g(e_w), lose_score = mean g(e_l), margin_loss (their
"OR loss") = -beta * mean(log sigmoid(T * log_odds)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Method, MethodConfig, StepOutputs
from .dpo import error_metrics
from .registry import register


@dataclass
class MaPOConfig(MethodConfig):
    beta: float = 0.1
    snr_value: float = 0.5
    num_train_timesteps: int = 1000


@register
class MaPO(Method):
    name = "mapo"
    paper = "MaPO (Hong et al., 2024)"
    Config = MaPOConfig
    config: MaPOConfig
    needs_reference = False
    prediction_types = frozenset({"epsilon", "v_prediction"})
    flow_refusal = ("MaPO's likelihood score g(e) = s e / (exp(s e) - 1) uses a constant SNR (snr_value) and the "
                    "multiplier T fitted to epsilon errors of a DDPM schedule; no flow-matching form is published or "
                    "derived here. Use dpo, cpo or sft on flow models")

    def score(self, err: Tensor) -> Tensor:
        x = self.config.snr_value * err
        return x / torch.expm1(x)

    def loss(self, out: StepOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        win, lose = self.score(out.err_w), self.score(out.err_l)
        inside = self.config.num_train_timesteps * (win - lose)
        margin_loss = -self.config.beta * F.logsigmoid(inside).mean()
        loss = out.err_w.mean() + margin_loss
        inside = inside.detach()
        return loss, {
            "loss": loss.detach(),
            "implicit_acc": (inside > 0).float().mean(),
            "reward_margin": inside.mean(),
            "win_score": win.detach().mean(),
            "lose_score": lose.detach().mean(),
            "margin_loss": margin_loss.detach(),
            **error_metrics(out),
        }
