"""Cal-DPO, calibrated DPO (Xiao et al., NeurIPS 2024), transcribed to diffusion by us.

The official code is for language models only: tengxiao1/Cal-DPO `scripts/dpo_trainer.py`
(`loss_type="Cal-DPO"`). Its loss on implicit rewards r (log-ratios, not multiplied by beta) is

    loss = -log sigmoid(r_w - r_l) + 0.5 * [mean_b (r_w - 1/(2 beta_cal))^2 + mean_b (r_l + 1/(2 beta_cal))^2]

(the calibration terms are batch means added to every pair, so the mean over pairs gives the same).
Our mapping (not official): r = -(beta/2) * (e_theta - e_ref), the Diffusion-DPO implicit reward, so
r_w - r_l is DPO's inside term (beta 5000, official convention) and beta = 5000, beta_cal = 0 would be
DPO. The calibration pulls the chosen reward to +1/(2 beta_cal) and the rejected to -1/(2 beta_cal).

beta_cal on this scale (our choice): 0.5, targets +-1, i.e. a reward margin of 2 (sigmoid(2) = 0.88),
and a penalty of 1 at initialisation, of the order of the DPO term (ln 2). The LLM recipe's 0.001
would ask for margins of 1000 here (a penalty of 250 000 at initialisation). On flow models r is built on
velocity errors with the flow DPO beta (dpo.py); beta_cal stays, since it acts on the reward scale. Guardrails:
guardrails.py (adaptive_beta adapts beta, so the calibration targets stay at +-1/(2 beta_cal) on the reward scale).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from .base import StepOutputs, by_prediction
from .dpo import FLOW_BETA, error_metrics
from .guardrails import GuardrailConfig, Guarded
from .registry import register


@dataclass
class CalDPOConfig(GuardrailConfig):
    beta: float = by_prediction(5000.0, FLOW_BETA)
    beta_cal: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta_cal <= 0.0:
            raise ValueError(f"method_args.beta_cal: must be > 0, got {self.beta_cal}")


@register
class CalDPO(Guarded):
    name = "cal-dpo"
    paper = "Cal-DPO (Xiao et al., NeurIPS 2024), diffusion transcription"
    Config = CalDPOConfig
    config: CalDPOConfig

    def loss(self, out: StepOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        out, beta = self.guardrails.begin(out, self.config.beta)
        k, target = 0.5 * beta, 0.5 / self.config.beta_cal
        r_w, r_l = -k * (out.err_w - out.ref_err_w), -k * (out.err_l - out.ref_err_l)
        dpo_loss = -F.logsigmoid(r_w - r_l).mean()
        calibration = 0.5 * ((r_w - target).pow(2).mean() + (r_l + target).pow(2).mean())
        loss = dpo_loss + calibration
        inside = (r_w - r_l).detach()
        return self.guardrails.finish(loss, {
            "loss": loss.detach(),
            "dpo_loss": dpo_loss.detach(),
            "calibration_loss": calibration.detach(),
            "implicit_acc": (inside > 0).float().mean(),
            "reward_margin": inside.mean(),
            "reward_w": r_w.detach().mean(),
            "reward_l": r_l.detach().mean(),
            **error_metrics(out),
        }, out)
