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

On rectified-flow models (SD3/SD3.5, Flux.1) this is Flow-DPO (Liu et al., "Improving Video Generation with
Human Feedback", arXiv 2501.13918, sec. 4): the same loss on per-image velocity errors
e = mean((v_theta(x_t, t) - (eps - x0))^2), both images of a pair sharing noise and timestep. Followed:
yifan123/flow_grpo `scripts/train_sd3_dpo.py` (the loss block after `target = noise - model_input`: per-image
mean velocity MSE, `inside_term = -0.5 * beta * w_l_diff`, logit-normal timesteps; `config/dpo.py` beta 100)
and bghira/SimpleTuner `simpletuner/helpers/distillation/flow_dpo/distiller.py` (`logits = 0.5 * beta *
margin`, but errors SUMMED over the latent (`norm_type="sum"`) and beta adapted to the margin's moving average,
clamped to [1e-3, 1]; documentation/experimental/FLOW_DPO.md).

Beta on flow models (`by_prediction`): 1000, with the official 0.5 factor and per-image MEAN errors. Why not
5000: the velocity target eps - x0 has per-dimension variance 2 on unit-variance latents (eps alone: 1) and,
at a noise level s, a velocity error is the epsilon error divided by (1 - s)^2 (x_t = (1-s) x0 + s eps gives
v = (eps - x_t) / (1 - s)), so the same change of the model moves a flow error margin several times more than an
epsilon margin: 5000 saturates the sigmoid in the first steps. 1000 sits between flow_grpo's 100 (online pairs
of the model's own samples, whose margins are large) and the epsilon 5000, and keeps the loss in the sigmoid's
working range on the tiny models (docs/methods.md, "Flow-DPO beta"). SimpleTuner's sum convention is beta_sum =
beta_ours / (number of latent elements); its auto-beta is the `adaptive_beta` guardrail.

Guardrails (`safeguard`, `adaptive_beta`, `sft_weight`): guardrails.py.

`space = "ncp"` asks the loop for errors in the noise-conditioned perception space (NCP-DPO,
Gambashidze et al. 2024, sakharok13/Aligning-Stable-Diffusion-with-Noise-Conditioned-Perception
`src/train/train_sd15.py`); that code has no 0.5 factor and beta 2500, i.e. the same multiplier.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from .base import StepOutputs, by_prediction, check_choice
from .guardrails import GuardrailConfig, Guarded
from .registry import register

SPACES = ("latent", "ncp")
#: the DPO beta on velocity errors (module docstring); methods with a beta scale theirs by FLOW_BETA / 5000
FLOW_BETA = 1000.0
FLOW_SCALE = FLOW_BETA / 5000.0


@dataclass
class DPOConfig(GuardrailConfig):
    beta: float = by_prediction(5000.0, FLOW_BETA)
    loss_type: str = "sigmoid"
    space: str = "latent"

    def __post_init__(self) -> None:
        super().__post_init__()
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
