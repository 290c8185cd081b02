"""Start test functions on N CPU ranks (gloo) in fresh spawned processes.

accelerate's debug_launcher forks; a forked child of a process that already ran OpenMP kernels can
hang in its first convolution, so tests spawn instead, on a free port (xdist runs tests side by side).
"""
from __future__ import annotations

import os
import socket
from typing import Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _enter(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), ACCELERATE_USE_CPU="1")
    try:
        fn(*args)
    finally:  # as trainer.run does: a process group left to interpreter exit can abort the rank (gloo)
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, args: tuple = (), world: int = 2) -> None:
    """Run fn(*args) on `world` ranks; a rank's exception fails the caller."""
    mp.start_processes(_enter, args=(world, free_port(), fn, args), nprocs=world, start_method="spawn")
