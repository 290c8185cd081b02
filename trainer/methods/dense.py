"""Temporally discounted DPO, offline pairwise form of the dense-reward method
(Yang, Chen, Zhou, ICML 2024, arXiv 2402.08265).

The official method is online: it samples 50-step DDIM trajectories, weights step k (k = 0 the first,
noisiest step) by gamma^k and clamps each per-step log ratio to [-clip, clip]
(Shentao-YANG/Dense_Reward_T2I `preference_based_policy_learner.py`: `policy_loss_weights`,
`soft_clip`; defaults `parse_args.py`: gamma 0.9, 50 steps, clip 1e-4). Ours, on offline pairs:

    P(step k) = gamma^k / sum_{k'<N} gamma^k'         k = 0..N-1
    t ~ uniform over step k's block [floor(T(N-1-k)/N), floor(T(N-k)/N))   # k = 0: the largest t
    h = clamp(e_ref - e_theta, -clip, clip)           (clip 0 = off, the default)
    loss = the DPO loss on h_w - h_l                  (see dpo.py; beta 5000, official convention)

The block of step k holds the k-th timestep of N-step "leading" and "trailing" schedules, and every
timestep stays trainable. The clamp is hard, as in the official code: the gradient is zero where
|h| > clip. Its scale differs from the official one (ours bounds an error difference, theirs a
per-dimension log-likelihood ratio): with beta 5000, clip c bounds the DPO logit by 2500 * 2c.

Timestep order: trainer timesteps grow with the noise for every family (forward_process.py), so step k's
block is the same on flow models. There an N-step Euler schedule visits s = shift(1 - k (1 - 1/T) / (N - 1)),
the unshifted time of which lies in block k (T/N-wide blocks of (t+1)/T), so step k is still the k-th
sampling step; the beta is the flow DPO beta (dpo.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..forward_process import TimestepSampling
from .base import StepOutputs
from .dpo import DPO, DPOConfig
from .registry import register


@dataclass
class DenseConfig(DPOConfig):
    gamma: float = 0.9
    num_steps: int = 50
    clip: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"method_args.gamma: must be in (0, 1], got {self.gamma}")
        if self.num_steps < 1:
            raise ValueError(f"method_args.num_steps: must be >= 1, got {self.num_steps}")
        if self.clip < 0.0:
            raise ValueError(f"method_args.clip: must be >= 0 (0 = off), got {self.clip}")


@register
class Dense(DPO):
    name = "dense"
    paper = "Dense-reward / temporally discounted DPO (Yang et al., ICML 2024)"
    Config = DenseConfig
    config: DenseConfig

    def step_probabilities(self) -> Tensor:
        """P(step k) for k = 0..N-1, in float64."""
        weights = self.config.gamma ** torch.arange(self.config.num_steps, dtype=torch.float64)
        return weights / weights.sum()

    def sample_timesteps(self, n: int, sampling: TimestepSampling, generator: torch.Generator) -> Tensor:
        steps, total = self.config.num_steps, sampling.num_train_timesteps
        if steps > total:
            raise ValueError(f"method_args.num_steps: {steps} exceeds num_train_timesteps {total}")
        k = torch.multinomial(self.step_probabilities(), n, replacement=True, generator=generator)
        low = torch.div(total * (steps - 1 - k), steps, rounding_mode="floor")
        high = torch.div(total * (steps - k), steps, rounding_mode="floor")
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return low + (u * (high - low)).long()

    def implicit_rewards(self, out: StepOutputs) -> tuple[Tensor, Tensor]:
        h_w, h_l = super().implicit_rewards(out)
        if self.config.clip > 0.0:
            c = self.config.clip
            h_w, h_l = h_w.clamp(-c, c), h_l.clamp(-c, c)
        return h_w, h_l
