"""Data-parallel training on 2 CPU processes (gloo): identical to one process with the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_pairs, tiny_config
from trainer.loop import TrainHooks, train
from trainer.run import make_backend

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
# splitting a batch across ranks changes the last float bits (~1e-7); beta scales them up in the loss
METHOD_ARGS = {"beta": 1000.0}


def backend_for(config):
    torch.manual_seed(config.seed)
    return make_backend(config, torch.device("cpu"))


def relative_distance(got: dict, want: dict, start: dict) -> float:
    """|got - want| / |want - start| over all tensors: the disagreement as a share of what training moved.

    Splitting a batch across ranks changes the last float bits of the gradients (~1e-7), and Adam scales
    its steps by 1/sqrt(v): on near-zero gradient entries that noise becomes a visible (but small) difference.
    """
    num = sum(((got[k].float() - want[k].float()) ** 2).sum() for k in want)
    den = sum(((want[k].float() - start[k].float()) ** 2).sum() for k in want)
    return float((num / den).sqrt())


def _rank_main(tmp: str) -> None:
    """One rank (forked by accelerate's debug_launcher): 2 steps, then resume to STEPS; record what it wrote."""
    from accelerate.state import PartialState

    from trainer import loop
    from trainer.atomic import save_safetensors
    from trainer.run import make_ranks

    PartialState._reset_state()  # nothing inherited from the parent process
    torch.set_num_threads(1)
    tmp_path = Path(tmp)
    ranks = make_ranks()
    writes = []
    for name in ("save_checkpoint", "write_lora", "write_text"):
        real = getattr(loop, name)
        setattr(loop, name, lambda *a, _real=real, _name=name, **k: (writes.append(_name), _real(*a, **k))[1])
    losses = []
    hooks = TrainHooks(on_step=lambda r: losses.append(r.metrics["loss"]))
    first = tiny_config(tmp_path / "dist", batch_size=1, max_steps=2, checkpoint_every=1, method_args=METHOD_ARGS)
    train(first, backend_for(first), make_pairs(8), hooks, ranks)
    resumed = tiny_config(tmp_path / "dist", batch_size=1, max_steps=STEPS, checkpoint_every=1, resume="latest",
                          method_args=METHOD_ARGS)
    backend = backend_for(resumed)  # a fresh model: everything comes from the checkpoint rank 0 wrote
    result = train(resumed, backend, make_pairs(8), hooks, ranks)
    save_safetensors(tmp_path / f"rank{ranks.rank}.safetensors", backend.adapter_state_dict())
    (tmp_path / f"rank{ranks.rank}.json").write_text(json.dumps(
        {"world_size": ranks.world_size, "steps": result.steps, "writes": writes, "losses": losses}))


def test_two_processes_train_what_one_process_trains_with_the_global_batch(tmp_path):
    from accelerate import debug_launcher

    from trainer.models.tiny import tiny_model_path

    tiny_model_path("tiny-sd")  # built here once, not by both ranks at the same time
    debug_launcher(_rank_main, args=(str(tmp_path),), num_processes=2)
    report = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert [report[r]["world_size"] for r in (0, 1)] == [2, 2] and report[0]["steps"] == STEPS
    assert report[1]["writes"] == [] and "save_checkpoint" in report[0]["writes"]  # rank 0 alone writes
    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key  # identical on both ranks, bit for bit
    assert report[0]["losses"] == report[1]["losses"]  # metrics are averaged across ranks

    single = tiny_config(tmp_path / "single", batch_size=2, max_steps=STEPS, method_args=METHOD_ARGS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        losses = []
        backend = backend_for(single)
        train(single, backend, make_pairs(8), TrainHooks(on_step=lambda r: losses.append(r.metrics["loss"])))
    finally:
        torch.set_num_threads(threads)
    assert report[0]["losses"] == pytest.approx(losses, abs=2e-4)
    assert abs(losses[-1] - losses[0]) > 1e-3  # training moved the model
    initial = backend_for(single).adapter_state_dict()
    trained = backend.adapter_state_dict()
    assert relative_distance(rank0, trained, initial) < 0.01
    dist_lora = load_file(str(tmp_path / "dist" / "out" / "lora.safetensors"))  # written by rank 0
    single_lora = load_file(str(tmp_path / "single" / "out" / "lora.safetensors"))
    assert dist_lora.keys() == single_lora.keys()
    assert relative_distance(dist_lora, single_lora, {k: torch.zeros_like(v) for k, v in single_lora.items()}) < 0.01
    lines = (tmp_path / "dist" / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, STEPS + 1))


CLI_CONFIG = """
model = "tiny-sd"
data = "tiny"
resolution = 32
batch_size = 1
max_steps = 2
learning_rate = 1e-3
rank = 4
alpha = 4.0
checkpoint_every = 1
seed = 0
"""


def test_cli_runs_under_torchrun(tmp_path):
    """`ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 -m trainer train ...` on CPU."""
    from trainer.config import load_toml, make_config
    from trainer.data.tiny import write_tiny_dataset
    from trainer.models.tiny import cache_root, tiny_model_path
    from trainer.run import run

    write_tiny_dataset(cache_root() / "data" / "tiny")
    tiny_model_path("tiny-sd")
    config = tmp_path / "run.toml"
    config.write_text(CLI_CONFIG)
    out = tmp_path / "dist"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "trainer", "train", "--config", str(config), "--output-dir", str(out),
                             "--cache-dir", str(tmp_path / "cache")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    single = make_config({**load_toml(config), "batch_size": 2, "output_dir": str(tmp_path / "single"),
                          "cache_dir": str(tmp_path / "cache-single")})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(single)  # one process, the same global batch, meanwhile
    finally:
        torch.set_num_threads(threads)

    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("Finished after 2 steps") == 1, stdout  # one run of two ranks, summarised by rank 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    got, want = load_file(str(out / "lora.safetensors")), load_file(str(tmp_path / "single" / "lora.safetensors"))
    assert got.keys() == want.keys()
    assert relative_distance(got, want, {k: torch.zeros_like(v) for k, v in want.items()}) < 0.01


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_sharding_configs_are_refused_with_a_pointer(monkeypatch, kind):
    from trainer.distributed import Ranks

    monkeypatch.setenv(f"ACCELERATE_USE_{kind}", "true")
    with pytest.raises(ValueError, match=rf"distributed_type {kind} is not used by PrefAlign.*MULTI_GPU"):
        Ranks.from_environment(cpu=True)
