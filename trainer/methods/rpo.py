"""Diffusion-RPO, relative preference optimization (Gu et al. 2024, arXiv 2406.06382).

The diffusion paper released no code (yigu1008/Diffusion-RPO holds only a README). We follow the
authors' LLM-RPO code (yinyueqin/relative-preference-optimization `trainers.py`, `RPOTrainer.loss`
and `RPOUnpairedTrainer.loss`; `config/loss/rpo-paired.yaml`: tau 0.5) on the diffusion implicit
rewards h = e_ref - e_theta, comparing every winner i with every loser j of the batch:

    L_ij = h_w,i - h_l,j
    W_ij = softmax_j(-(1 - cos(emb_i, emb_j)) / tau)
    weighting "logit" (default, the authors' form): loss = mean_ij -log sigmoid(beta/2 * W_ij * L_ij)
    weighting "loss":                               loss = mean_i sum_j W_ij * -log sigmoid(beta/2 * L_ij)

beta is in the official Diffusion-DPO convention (5000, multiplier beta/2); the diagonal j = i is
exactly the DPO logit (same prompt, timestep and noise).

Embeddings (`embedding`): "prompt" compares the prompts of pairs i and j (rpo-paired); "image"
compares chosen image i with rejected image j (rpo-unpaired); "both" averages the two cosine
distances (ours). The loop supplies CLIP-space embeddings in `prompt_emb` / `image_emb`.

W scaling (our decision): W is not rescaled by the batch size, as in the authors' code, so "logit"
reproduces their loss (and methods-sources section 10.7). Its effective beta then depends on the
batch: beta*W_ij lies in (0, beta], and B identical prompts give each term beta/B. "loss" keeps
beta's DPO meaning whatever the batch: W only mixes per-pair DPO losses, identity weights give
Diffusion-DPO exactly and identical prompts give all-pairs DPO at the full beta. On flow models: the same
on velocity-error rewards with the flow DPO beta (dpo.py); the pipeline's pooled text embedding is CLIP's.
Guardrails: guardrails.py (adaptive_beta follows the diagonal, per-pair DPO margins).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import EMBEDDINGS, StepOutputs, by_prediction, check_choice
from .dpo import FLOW_BETA, error_metrics
from .guardrails import GuardrailConfig, Guarded
from .registry import register


@dataclass
class RPOConfig(GuardrailConfig):
    beta: float = by_prediction(5000.0, FLOW_BETA)
    tau: float = 0.5
    weighting: str = "logit"
    embedding: str = "prompt"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("weighting", self.weighting, ("logit", "loss"))
        check_choice("embedding", self.embedding, ("prompt", "image", "both"))
        if self.tau <= 0.0:
            raise ValueError(f"method_args.tau: must be > 0, got {self.tau}")


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """1 - cos between every row of a and every row of b, in at least float32."""
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return 1.0 - F.normalize(a.to(dtype), dim=-1) @ F.normalize(b.to(dtype), dim=-1).T


@register
class RPO(Guarded):
    name = "rpo"
    paper = "Diffusion-RPO (Gu et al., 2024)"
    Config = RPOConfig
    config: RPOConfig
    needs = frozenset({EMBEDDINGS})
    wants_related_prompts = True

    @property
    def embeddings(self) -> frozenset[str]:
        return frozenset({"prompt", "image"}) if self.config.embedding == "both" else frozenset({self.config.embedding})

    def distances(self, out: StepOutputs) -> Tensor:
        """[B, B] distances between winner i and loser j."""
        terms = []
        if self.config.embedding in ("prompt", "both"):
            if out.prompt_emb is None:
                raise ValueError("rpo: StepOutputs.prompt_emb is missing")
            prompts = out.chosen(out.prompt_emb)
            terms.append(cosine_distance(prompts, prompts))
        if self.config.embedding in ("image", "both"):
            if out.image_emb is None:
                raise ValueError(f"rpo: embedding={self.config.embedding!r} needs StepOutputs.image_emb")
            terms.append(cosine_distance(out.chosen(out.image_emb), out.rejected(out.image_emb)))
        return torch.stack(terms).mean(0)

    def weights(self, out: StepOutputs) -> Tensor:
        return torch.softmax(-self.distances(out) / self.config.tau, dim=1)

    def loss(self, out: StepOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        out, beta = self.guardrails.begin(out, self.config.beta)
        h_w, h_l = out.ref_err_w - out.err_w, out.ref_err_l - out.err_l
        logits = 0.5 * beta * (h_w[:, None] - h_l[None, :])
        w = self.weights(out).detach().to(logits.dtype)
        if self.config.weighting == "logit":
            loss = -F.logsigmoid(w * logits).mean()
        else:
            loss = -(w * F.logsigmoid(logits)).sum(1).mean()
        inside = logits.detach().diagonal()
        return self.guardrails.finish(loss, {
            "loss": loss.detach(),
            "implicit_acc": (inside > 0).float().mean(),
            "reward_margin": inside.mean(),
            "weight_diagonal": w.diagonal().mean(),
            **error_metrics(out),
        }, out)
