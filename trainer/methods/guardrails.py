"""Guardrails of the DPO-family losses (dpo, dense, cpo, cal-dpo, rpo, npo), written once for all of them.

A preference loss only asks the chosen image to be denoised better *than the rejected one*; it can
widen that margin while the chosen image's own error grows, and the model drifts away from what it
did well (prompt fidelity among it). Three options limit that; each method's loss calls
`Guardrails.begin` on its inputs and `Guardrails.finish` on its loss.

**safeguard** (Diffusion-SDPO, Fu et al. 2025, arXiv 2511.03317). Followed: AIDC-AI/Diffusion-SDPO
`train.py`, `get_adaptive_lose_l_scale` and the lines that use it before the DPO loss
(`model_losses_l_scaled`); `scripts/train/sd15_diffusion_dpo.sh` (mu 0.9; the SDXL scripts use 0.6).
With r = prediction - target of the chosen (w) and rejected (l) halves of the micro-batch, flattened:

    lambda = clamp((1 - mu) * <r_w, r_w> / <r_w, r_l>, 0, 1)  if <r_w, r_l> > 0, else 1
    e_l   <- e_l.detach() + lambda * (e_l - e_l.detach())      # same value; the loser's gradient times lambda

The official code takes the output-space gradients of A = mean(r_w^2) and B = mean(r_l^2), 2 r / n
with the same n, so their ratio ||grad A||^2 / (grad B . grad A) is the residual ratio above. With
the update -grad(A) + lambda grad(B) (output-space proxy), the winner's error does not grow to first
order: (-grad A + lambda grad B) . grad A <= -mu ||grad A||^2. Errors must be the latent MSE
(`space = "latent"`): in NCP space the residuals are not the gradient of the errors.

**adaptive_beta** (bghira/SimpleTuner `documentation/experimental/FLOW_DPO.md`, `auto_beta`;
`simpletuner/helpers/distillation/flow_dpo/distiller.py`, `_beta_for_margin`). With m the margin the
method's beta multiplies (h_w - h_l, h = e_ref - e_theta; cpo: e_l - e_theta_w), per micro-batch:

    a_t   = mean_b |m_b|                                         # averaged over ranks
    ema_1 = a_1,  ema_t = decay * ema_{t-1} + (1 - decay) * a_t
    k_t   = clamp(-logit(target) / ema_t, k / 1000, k)            # k = the configured multiplier

so a pair at the average margin keeps the weight sigmoid(-k_t m) = target in its gradient instead of
saturating. k is beta/2 in the official Diffusion-DPO convention (cpo: beta); SimpleTuner's clamp
[1e-3, 1] with its default beta 1 is the same ratio. The EMA is saved in checkpoints.

**sft_weight**: adds sft_weight * mean(e_theta_w), the SFT anchor on the chosen images (LLM-CPO,
Xu et al. 2024; SimpleTuner's `sft_loss_weight`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import RESIDUALS, Method, MethodConfig, StepOutputs, _required, rank_mean

#: SimpleTuner's auto-beta range: [1e-3, 1] x the configured multiplier.
MIN_BETA_RATIO = 1e-3


@dataclass
class GuardrailConfig(MethodConfig):
    """The guardrail options every DPO-family method takes (off by default)."""

    safeguard: bool = False
    safeguard_mu: float = 0.9
    adaptive_beta: bool = False
    adaptive_beta_target: float = 0.2
    adaptive_beta_decay: float = 0.99
    sft_weight: float = 0.0


GUARDRAIL_FIELDS = tuple(f.name for f in dataclasses.fields(GuardrailConfig))


def check_guardrails(config: GuardrailConfig) -> None:
    """ValueError naming the option when a guardrail value is out of range."""
    if not 0.0 <= config.safeguard_mu <= 1.0:
        raise ValueError(f"method_args.safeguard_mu: must be in [0, 1], got {config.safeguard_mu}")
    if not 0.0 < config.adaptive_beta_target < 0.5:
        raise ValueError(f"method_args.adaptive_beta_target: must be in (0, 0.5), got {config.adaptive_beta_target}")
    if not 0.0 <= config.adaptive_beta_decay < 1.0:
        raise ValueError(f"method_args.adaptive_beta_decay: must be in [0, 1), got {config.adaptive_beta_decay}")
    if config.sft_weight < 0.0:
        raise ValueError(f"method_args.sft_weight: must be >= 0, got {config.sft_weight}")
    if config.safeguard and getattr(config, "space", "latent") != "latent":
        raise ValueError("method_args.safeguard: the safeguard scales gradients through the latent prediction's "
                         "residuals, so it needs space = 'latent'")


def loser_scale(out: StepOutputs, mu: float, eps: float = 1e-9) -> Tensor:
    """SDPO's lambda for the whole micro-batch (module docstring), detached, in at least float32."""
    pred, target = _required(out.pred, "pred").detach(), _required(out.target, "target").detach()
    residual = (pred - target).to(torch.promote_types(pred.dtype, torch.float32))
    r_w, r_l = out.chosen(residual).flatten(), out.rejected(residual).flatten()
    g_w, g_l = 2.0 * r_w / r_w.numel(), 2.0 * r_l / r_l.numel()  # gradients of mean(r^2), as the official code
    num, den = g_w.dot(g_w), g_l.dot(g_w)
    cap = (1.0 - mu) * num / (den + eps)
    return torch.where(den > 0, cap, torch.ones_like(cap)).clamp(0.0, 1.0)


def scale_loser_gradient(out: StepOutputs, scale: Tensor) -> StepOutputs:
    """`out` with the rejected errors' gradient multiplied by `scale` (their values unchanged)."""
    e_l = out.err_l
    e_l = e_l.detach() + scale.to(e_l.dtype) * (e_l - e_l.detach())
    return StepOutputs(**{**vars(out), "err": torch.cat([out.err_w, e_l])})


def preference_margin(out: StepOutputs) -> Tensor:
    """Per pair, what beta multiplies: h_w - h_l with a reference, else e_l - e_w (cpo), detached."""
    if out.ref_err is None:
        return (out.err_l - out.err_w).detach()
    return ((out.ref_err_w - out.err_w) - (out.ref_err_l - out.err_l)).detach()


class Guardrails:
    """The guardrails of one method instance; holds adaptive beta's margin average between steps (a tensor on
    the training device: no host sync per step; a plain number in checkpoints)."""

    def __init__(self, config: GuardrailConfig) -> None:
        check_guardrails(config)
        self.config = config
        self.margin_ema: Tensor | None = None
        self.metrics: dict[str, Tensor] = {}

    def begin(self, out: StepOutputs, beta: float, factor: float = 0.5) -> tuple[StepOutputs, Tensor | float]:
        """The step's inputs with the safeguard applied, and the beta to use (adaptive or as configured).

        `factor` is what multiplies beta in the method's logit (0.5 in the Diffusion-DPO convention, 1 for cpo).
        """
        self.metrics = {}
        if self.config.safeguard:
            scale = loser_scale(out, self.config.safeguard_mu)
            out = scale_loser_gradient(out, scale)
            self.metrics["loser_scale"] = scale
        if self.config.adaptive_beta:
            beta = self.adapt_beta(preference_margin(out).abs().mean(), beta, factor)
            self.metrics["beta"] = beta
        return out, beta

    def adapt_beta(self, mean_abs_margin: Tensor, beta: float, factor: float) -> Tensor:
        """Update the margin EMA with this micro-batch and return the adapted beta (module docstring)."""
        a = rank_mean(mean_abs_margin.detach().double())
        decay = self.config.adaptive_beta_decay
        ema = a if self.margin_ema is None else decay * self.margin_ema.to(a) + (1.0 - decay) * a
        self.margin_ema = ema
        target = self.config.adaptive_beta_target
        k = -math.log(target / (1.0 - target)) / ema.clamp(min=1e-12)  # -logit(target) / ema
        k_max = factor * beta
        return (k.clamp(MIN_BETA_RATIO * k_max, k_max) / factor).to(mean_abs_margin.dtype)

    def finish(self, loss: Tensor, metrics: dict[str, Tensor], out: StepOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss with the SFT anchor added, and the metrics with the guardrails' own."""
        if self.config.sft_weight > 0.0:
            anchor = out.err_w.mean()
            loss = loss + self.config.sft_weight * anchor
            metrics = {**metrics, "loss": loss.detach(), "sft_loss": anchor.detach()}
        return loss, {**metrics, **self.metrics}

    def state_dict(self) -> dict[str, Any]:
        return {"margin_ema": None if self.margin_ema is None else float(self.margin_ema)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ema = state.get("margin_ema")
        self.margin_ema = None if ema is None else torch.tensor(ema, dtype=torch.float64)


class Guarded(Method):
    """A method whose Config extends GuardrailConfig: owns its `Guardrails` and saves their state.

    The safeguard reads the policy's predictions and targets, so it adds RESIDUALS to `needs`.
    """

    config: GuardrailConfig
    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: MethodConfig | None = None) -> None:
        super().__init__(config)
        self.guardrails = Guardrails(self.config)
        if self.config.safeguard:
            self.needs = type(self).needs | {RESIDUALS}  # type: ignore[misc]  # per instance: depends on the options

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The method's own options first, then the guardrails (the order the node's widget shows)."""
        options = super().defaults()
        return {**{k: v for k, v in options.items() if k not in GUARDRAIL_FIELDS}, **{k: options[k] for k in GUARDRAIL_FIELDS}}

    def state_dict(self) -> dict[str, Any]:
        return self.guardrails.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.guardrails.load_state_dict(state)
