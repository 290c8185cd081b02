"""CPO for diffusion, the reference-free form used by NCP-DPO (Gambashidze et al. 2024).

    loss = mean(-log sigmoid(-beta * (e_theta_w - e_theta_l))) + sft_weight * mean(e_theta_w)

Source: sakharok13/Aligning-Stable-Diffusion-with-Noise-Conditioned-Perception
`src/train/train_sd15.py`, `loss_type=cpo` (beta 2500, no 0.5 factor: the same multiplier as DPO's
official beta 5000; no SFT term). `sft_weight` adds the chosen-image NLL term of LLM-CPO (Xu et al.
2024); default 0 (the NCP form), now the shared guardrail option (guardrails.py, with `safeguard` and
`adaptive_beta`, whose multiplier here is beta itself). `space` picks latent or NCP errors. On flow models the
same loss on velocity errors (the CPO derivation uses the policy's errors only as log-likelihood surrogates, which
holds for any Gaussian parameterisation), beta scaled as DPO's (dpo.py: 2500 -> 500).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from .base import StepOutputs, by_prediction, check_choice
from .dpo import FLOW_SCALE, SPACES, error_metrics
from .guardrails import GuardrailConfig, Guarded
from .registry import register


@dataclass
class CPOConfig(GuardrailConfig):
    beta: float = by_prediction(2500.0, 2500.0 * FLOW_SCALE)
    space: str = "latent"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("space", self.space, SPACES)


@register
class CPO(Guarded):
    name = "cpo"
    paper = "CPO, diffusion form of NCP-DPO (Gambashidze et al., 2024)"
    Config = CPOConfig
    config: CPOConfig
    needs_reference = False

    def loss(self, out: StepOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        out, beta = self.guardrails.begin(out, self.config.beta, factor=1.0)
        inside = -beta * (out.err_w - out.err_l)
        loss = -F.logsigmoid(inside).mean()
        inside = inside.detach()
        return self.guardrails.finish(loss, {
            "loss": loss.detach(),
            "implicit_acc": (inside > 0).float().mean(),
            "reward_margin": inside.mean(),
            **error_metrics(out),
        }, out)
