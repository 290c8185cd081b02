"""KTO's reference point is averaged over ranks (two gloo processes on CPU)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ranks import run_ranks
from trainer.methods import StepOutputs, build_method

# each rank's policy errors; reference errors are 0.5, labels all desirable
ERRORS = {0: [0.490, 0.494], 1: [0.497, 0.499]}  # g = 0.5 - e: means 0.008 and 0.002


def _rank(results) -> None:
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        err = torch.tensor(ERRORS[rank], dtype=torch.float64)
        out = StepOutputs(err=err, timesteps=torch.zeros(2), labels=torch.ones(2, dtype=torch.float64),
                          ref_err=torch.full((2,), 0.5, dtype=torch.float64))
        results[rank] = build_method("kto").loss(out)[1]["z0"].item()
    finally:
        dist.destroy_process_group()


def test_kto_reference_point_is_all_reduced():
    results = mp.Manager().dict()
    run_ranks(_rank, (results,))
    assert results[0] == pytest.approx(0.005, abs=1e-12)
    assert results[1] == pytest.approx(0.005, abs=1e-12)
