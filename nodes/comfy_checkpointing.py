"""Gradient checkpointing for a ComfyUI diffusion model, block by block, undone on exit."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.utils.checkpoint
from torch import nn


def outermost_blocks(root: nn.Module) -> list[nn.Module]:
    """The outermost modules below `root` that compute something (containers are opened): what
    gradient checkpointing wraps, as ComfyUI's own trainer does."""
    found = []
    for child in root.children():
        if isinstance(child, (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
            found += outermost_blocks(child)
        else:
            found.append(child)
    return found


@contextmanager
def checkpointed(blocks: Sequence[nn.Module]) -> Iterator[None]:
    """Inside: each block recomputes its activations in backward (only when grad is on; sampling under
    no_grad runs as usual). On exit every block gets back exactly the forward it had."""
    saved = [(block, block.__dict__.get("forward")) for block in blocks]
    for block, _ in saved:
        block.forward = _checkpointing(block.forward)
    try:
        yield
    finally:
        for block, own in saved:
            if own is None:
                del block.forward
            else:
                block.forward = own


def _checkpointing(forward):
    def wrapped(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return wrapped
