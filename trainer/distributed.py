"""Ranks of a data-parallel run (torchrun / accelerate launch), or a single process.

LoRA gradients are small, so they are all-reduced explicitly after backward (DDP semantics) rather
than by wrapping the UNet: the adapter can then be switched off for the reference forward on the
plain module (there is no DDP wrapper to unwrap, so peft's hooks and `requires_grad` are never touched
behind DDP's back), and gradient checkpointing needs no special care.

Every rank draws the same global batch of keys and the same noise from the same seed and keeps its
share, so W processes with batch B train exactly what one process with batch W*B trains; the
averaged gradients are bit-identical on every rank, so the adapters stay identical without a
broadcast. Rank 0 alone writes files; every rank reads a checkpoint when resuming. See
docs/distributed.md.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


SHARDED = ("FSDP", "DEEPSPEED", "MEGATRON_LM")


def check_launch_config() -> None:
    """Refuse accelerate configs that ask for sharding (PrefAlign would silently ignore them otherwise)."""
    for kind in SHARDED:  # `accelerate launch` marks these in the environment
        if os.environ.get(f"ACCELERATE_USE_{kind}", "false").lower() == "true":
            raise ValueError(
                f"accelerate config: distributed_type {kind} is not used by PrefAlign. Only the LoRA (a few MB) "
                "is trained; the frozen base model is replicated and the LoRA gradients are all-reduced "
                "(data parallel, DDP semantics). Launch with a MULTI_GPU config (examples/accelerate/) or "
                "torchrun; see docs/distributed.md.")


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    device: torch.device

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> "Ranks":
        return cls(0, 1, torch.device(device))

    @classmethod
    def from_environment(cls, cpu: bool = False) -> "Ranks":
        """Join the process group that torchrun or accelerate set up (gloo on CPU, nccl on GPU)."""
        from accelerate import PartialState

        check_launch_config()
        state = PartialState(cpu=cpu)
        return cls(state.process_index, state.num_processes, state.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def average_gradients(self, params: list[nn.Parameter]) -> None:
        if self.world_size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def average_metrics(self, metrics: dict[str, torch.Tensor]) -> dict[str, float]:
        """One host sync for all metrics (and one all-reduce across ranks)."""
        names = sorted(metrics)
        values = torch.stack([metrics[n].detach().float().reshape(()).to(self.device) for n in names])
        if self.world_size > 1:
            dist.all_reduce(values)
            values /= self.world_size
        return dict(zip(names, values.cpu().tolist()))

    def check_agree(self, value: int, what: str) -> None:
        """Raise on every rank unless all ranks hold the same `value` (e.g. the step they resumed at)."""
        if self.world_size == 1:
            return
        mine = torch.tensor([value], dtype=torch.int64, device=self.device)
        values = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(values, mine)
        values = [int(v.item()) for v in values]
        if len(set(values)) > 1:
            raise ValueError(f"ranks disagree on {what}: " + ", ".join(f"rank {r}: {v}" for r, v in enumerate(values)))

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any rank (a stop request: all ranks stop at the same step)."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([int(flag)], dtype=torch.int64, device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group. Left to interpreter exit, gloo's threads can be torn down unjoined and the
        rank aborts ("terminate called without an active exception") after a finished run, which torchrun
        then reports as a failure."""
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
