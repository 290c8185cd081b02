"""Supervised fine-tuning on the chosen image only: the baseline of the Diffusion-DPO paper.

    loss = mean(e_theta_w)

Source: SalesforceAIResearch/DiffusionDPO `train.py` with `--sft` (keeps the winner,
`F.mse_loss(model_pred, target)`, no reference; the paper's SFT learning rate is 1e-9 full
fine-tune). The loop runs only the chosen half (`uses_rejected = False`), so `out.err` normally holds
chosen rows only; the mean is taken over the rows labelled chosen, which also covers a full batch.
`space = "ncp"` gives NCP-SFT (sakharok13/Aligning-Stable-Diffusion-with-Noise-Conditioned-Perception,
`loss_type=sft`). On flow models: the flow-matching loss on the chosen images (diffusers'
train_dreambooth_lora_sd3.py / _flux.py objective, unweighted).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import Method, MethodConfig, StepOutputs, check_choice
from .dpo import SPACES
from .registry import register


@dataclass
class SFTConfig(MethodConfig):
    space: str = "latent"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("space", self.space, SPACES)


@register
class SFT(Method):
    name = "sft"
    paper = "SFT on chosen images (baseline in Wallace et al., CVPR 2024)"
    Config = SFTConfig
    needs_reference = False
    uses_rejected = False

    def loss(self, out: StepOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        chosen = out.labels.to(out.err.dtype)
        loss = (out.err * chosen).sum() / chosen.sum().clamp(min=1.0)
        return loss, {"loss": loss.detach(), "err_w": loss.detach()}
