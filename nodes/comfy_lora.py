"""The LoRA as ComfyUI weight wrappers: one small trainable module per targeted weight, kohya names."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

PREFIX = "diffusion_model."


class LoraWeight(nn.Module):
    """w -> w + (alpha / rank) * up @ down, or w itself while disabled. A ComfyUI weight wrapper."""

    def __init__(self, shape: torch.Size, rank: int, alpha: float, generator: torch.Generator | None = None) -> None:
        super().__init__()
        out_dim, in_dim = shape[0], int(math.prod(shape[1:]))
        self.shape = tuple(shape)
        self.rank, self.alpha = rank, float(alpha)
        self.lora_down = nn.Parameter(torch.randn(rank, in_dim, generator=generator) / rank)
        self.lora_up = nn.Parameter(torch.zeros(out_dim, rank))  # zero: the policy starts as the base model
        self.enabled = True

    def __call__(self, w: Tensor) -> Tensor:
        if not self.enabled:
            return w
        diff = (self.lora_up @ self.lora_down) * (self.alpha / self.rank)
        return w + diff.reshape(w.shape).to(w.dtype)

    def passive_memory_usage(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def move_to(self, device) -> int:
        self.to(device=device)
        return self.passive_memory_usage()


def identity_wrapper(w: Tensor) -> Tensor:
    """Identity weight wrapper. A wrapper makes ComfyUI cast a *copy* of the weight, so frozen weights
    loaded under inference mode become ordinary tensors autograd may save for backward."""
    return w


def kohya_name(module_key: str) -> str:
    """`diffusion_model.a.b.c` -> `lora_unet_a_b_c` (ComfyUI maps this for every model family)."""
    if not module_key.startswith(PREFIX):
        raise ValueError(f"not a diffusion-model key: {module_key}")
    return "lora_unet_" + module_key[len(PREFIX):].replace(".", "_")


def matches_target(module_key: str, targets: Sequence[str]) -> bool:
    return any(module_key == t or module_key.endswith("." + t) for t in targets)
