"""Exact gradients through ComfyUI's model code, and gradient checkpointing for it, block by block.

ComfyUI writes its models for inference, and some update activations in place: ComfyUI 0.3.64's Flux blocks
add to the text stream and the single-stream input with `+=` (comfy/ldm/flux/layers.py), Chroma's with
`addcmul_` (comfy/ldm/chroma/layers.py), and those tensors are the blocks' own inputs or were saved for the
backward pass before. Autograd then stops with "modified by an inplace operation", or computes a wrong gradient
without a word (measured on a tiny Flux: 0.01% off the finite-difference slope, which the snapshots below match to
1e-5 of it); torch's own checkpoint keeps the block's inputs and recomputed tensors by reference, so the updates
reach them too (0.1% off). Hence:

- `snapshot_saved_tensors()`: while it is open, autograd saves a copy of every intermediate tensor it keeps for
  backward (weights and other leaves stay shared), so an in-place update after the save changes nothing.
- `checkpointed(blocks)`: each block saves nothing in the forward pass but (copies of) its inputs, and recomputes
  its saved tensors, as snapshots, the first time backward needs one; the block always runs on fresh copies of its
  inputs, so it cannot change what the recomputation starts from. Only with grad on: sampling runs as usual.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn


def outermost_blocks(root: nn.Module) -> list[nn.Module]:
    """The outermost modules below `root` that compute something (containers are opened): what
    gradient checkpointing wraps, as ComfyUI's own trainer does (the transformer blocks of every family)."""
    found = []
    for child in root.children():
        if isinstance(child, (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
            found += outermost_blocks(child)
        else:
            found.append(child)
    return found


def _snapshot(t: Tensor) -> Tensor:
    """A saved tensor as autograd first saw it: intermediates are copied, leaves (weights, inputs) shared."""
    return t.clone() if t.grad_fn is not None else t


@contextmanager
def snapshot_saved_tensors() -> Iterator[None]:
    with torch.autograd.graph.saved_tensors_hooks(_snapshot, lambda t: t):
        yield


def _copy(value: Any) -> Any:
    """A tensor argument's copy (in the graph: gradients flow through it), so the block cannot update the caller's."""
    return value.clone() if isinstance(value, Tensor) else value


class _Kept:
    """A tensor argument as the recomputation starts from it: a copy out of the graph, and whether it required grad.
    (Tensors nested in tuples, such as Chroma's modulation vectors, are passed as they are: blocks only read them.)"""

    def __init__(self, value: Tensor) -> None:
        self.tensor, self.requires_grad = value.detach().clone(), value.requires_grad

    def fresh(self) -> Tensor:
        """A new non-leaf copy that requires grad as the original did, so the block saves the same tensors and may
        update it in place."""
        if self.requires_grad:
            return self.tensor.detach().requires_grad_(True).clone()
        return self.tensor.clone()


def _kept(value: Any) -> Any:
    return _Kept(value) if isinstance(value, Tensor) else value


def _fresh(value: Any) -> Any:
    return value.fresh() if isinstance(value, _Kept) else value


class _Recomputed:
    """One checkpointed call: the forward pass saves indices; backward recomputes the saved tensors once."""

    def __init__(self, forward, args: tuple, kwargs: dict) -> None:
        self.forward, self.count, self.saved = forward, 0, None
        self.args = tuple(_kept(a) for a in args)  # the call's inputs, as they were before the block ran
        self.kwargs = {k: _kept(v) for k, v in kwargs.items()}
        self.autocast = [(d, torch.get_autocast_dtype(d)) for d in ("cuda", "cpu") if torch.is_autocast_enabled(d)]

    def pack(self, _tensor: Tensor) -> int:
        self.count += 1
        return self.count - 1

    def unpack(self, index: int) -> Tensor:
        if self.saved is None:
            self.saved = self._recompute()
        return self.saved[index]

    def _recompute(self) -> list[Tensor]:
        saved: list[Tensor] = []

        def pack(t: Tensor) -> int:
            saved.append(_snapshot(t))
            return len(saved) - 1

        autocast = torch.autocast(*self.autocast[0]) if self.autocast else nullcontext()
        with torch.enable_grad(), autocast, torch.autograd.graph.saved_tensors_hooks(pack, saved.__getitem__):
            self.forward(*(_fresh(a) for a in self.args), **{k: _fresh(v) for k, v in self.kwargs.items()})
        if len(saved) != self.count:
            raise RuntimeError(f"gradient checkpointing: the block saved {len(saved)} tensors when recomputed, "
                               f"{self.count} in the forward pass (it does not compute the same thing twice)")
        return saved


def _checkpointing(forward):
    def wrapped(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        call = _Recomputed(forward, args, kwargs)
        with torch.autograd.graph.saved_tensors_hooks(call.pack, call.unpack):  # copies, in the graph: the block may
            return forward(*(_copy(a) for a in args), **{k: _copy(v) for k, v in kwargs.items()})  # update them

    return wrapped


@contextmanager
def checkpointed(blocks: Sequence[nn.Module]) -> Iterator[None]:
    """Inside: each block recomputes its activations in backward (see the module docstring). On exit every
    block gets back exactly the forward it had."""
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
