"""Diffusion-NPO, negative preference optimization (Wang et al., ICLR 2025, arXiv 2505.11245).

Trains a LoRA toward the *rejected* images, to be used in the unconditional (negative) branch of
classifier-free guidance: guidance then pushes away from what people dislike, with or without a
positive preference LoRA on the model. The training is Diffusion-DPO with chosen and rejected swapped:

    loss = DPO loss (dpo.py) on the pairs (x_l, x_w)        # h = e_ref - e_theta; inside = beta/2 (h_l - h_w)

Followed: G-U-N/Diffusion-NPO `DPO-DPO-NPO/train_sd15.py`, the diffusers DPO LoRA script whose only
change is the pair order in `preprocess_train` (`if label_0 == 1: im_tup = im_tup[::-1]`: the image
people preferred goes second). Defaults: `run_sd15.sh` beta_dpo 500 on the logit without the 1/2,
which is beta 1000 in our (official Diffusion-DPO) convention; SDXL (`run_sdxl.sh`, `train_sdxl.py`
with the 1/2) uses 2000. Both train rank 8 at lr 5e-6. On flow models (SD3) beta scales as DPO's (dpo.py). Sampling with the LoRA in the negative branch
follows `pipeline_stable_diffusion_double_unet.py`:

    eps = eps_{theta+npo}(x_t, c_neg) + w * (eps_theta(x_t, c) - eps_{theta+npo}(x_t, c_neg))

headless in trainer/toy/sampling.py (`negative_lora=`), in ComfyUI with nodes/npo_node.py. Metrics
are the DPO ones on the swapped pairs: `implicit_acc` is the share of pairs where the LoRA leans to
the rejected image, `err_w` the error on the rejected images. The guardrails (guardrails.py) protect
the rejected image's error, the side NPO trains toward.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .base import StepOutputs, by_prediction
from .dpo import DPO, FLOW_SCALE, DPOConfig
from .registry import register


@dataclass
class NPOConfig(DPOConfig):
    beta: float = by_prediction(1000.0, 1000.0 * FLOW_SCALE)  # flow: scaled as DPO's (dpo.py)


def swap_pairs(out: StepOutputs) -> StepOutputs:
    """`out` with the chosen and rejected halves exchanged in every per-image tensor."""
    def swap(x: Tensor | None) -> Tensor | None:
        return None if x is None else torch.cat([out.rejected(x), out.chosen(x)])

    return StepOutputs(**{f.name: swap(getattr(out, f.name)) for f in fields(out)})


@register
class NPO(DPO):
    name = "npo"
    paper = "Diffusion-NPO (Wang et al., ICLR 2025): DPO toward the rejected images, for the CFG negative branch"
    Config = NPOConfig
    config: NPOConfig
    negative_branch = True

    def loss(self, out: StepOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        return super().loss(swap_pairs(out))
