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
from ranks import run_ranks
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
    """One rank (spawned by tests/ranks.py): 2 steps, then resume to STEPS; record what it wrote."""
    from trainer import loop
    from trainer.atomic import save_safetensors
    from trainer.run import make_ranks

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
    from trainer.models.tiny import tiny_model_path

    tiny_model_path("tiny-sd")  # built here once, not by both ranks at the same time
    run_ranks(_rank_main, (str(tmp_path),))
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
    assert relative_distance(dist_lora, single_lora, backend_for(single).export_lora()) < 0.01
    lines = (tmp_path / "dist" / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, STEPS + 1))


def _rank_resume_unshared(tmp: str) -> None:
    """Rank 0 sees a checkpoint, rank 1 (as on a machine without the shared folder) does not."""
    from trainer.run import make_ranks

    torch.set_num_threads(1)
    ranks = make_ranks()
    folder = Path(tmp) / ("shared" if ranks.rank == 0 else "local")
    config = tiny_config(folder, batch_size=1, max_steps=2, resume="latest")
    try:
        train(config, backend_for(config), make_pairs(4), ranks=ranks)
    except ValueError as e:
        (Path(tmp) / f"error{ranks.rank}.txt").write_text(str(e))


def test_resume_refuses_when_ranks_do_not_see_the_same_checkpoint(tmp_path):
    first = tiny_config(tmp_path / "shared", batch_size=2, max_steps=1, checkpoint_every=1)
    train(first, backend_for(first), make_pairs(4))
    run_ranks(_rank_resume_unshared, (str(tmp_path),))
    for rank in (0, 1):
        assert (tmp_path / f"error{rank}.txt").read_text() == (
            "ranks disagree on the step to resume from (every rank must see the checkpoints rank 0 writes: put "
            "output_dir on storage that all machines share): rank 0: 1, rank 1: 0")


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


LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"],
}


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_cli_runs_under_torchrun_and_accelerate_launch(tmp_path, launcher):
    """`ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 -m trainer train ...` on CPU,
    and `accelerate launch --multi_gpu --num_processes 2 -m trainer train ...` (gloo with ACCELERATE_USE_CPU=1)."""
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
    proc = subprocess.Popen([sys.executable, *LAUNCHERS[launcher], "-m", "trainer", "train", "--config", str(config), "--output-dir", str(out),
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
    assert proc.returncode == 0, "\n".join(line for line in stderr.splitlines() if "Error" in line or "[rank" in line)[-6000:]
    assert stdout.count("Finished after 2 steps") == 1, stdout  # one run of two ranks, summarised by rank 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    got, want = load_file(str(out / "lora.safetensors")), load_file(str(tmp_path / "single" / "lora.safetensors"))
    assert got.keys() == want.keys()
    assert relative_distance(got, want, backend_for(single).export_lora()) < 0.01  # vs. what training moved


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_sharding_configs_are_refused_with_a_pointer(monkeypatch, kind):
    from trainer.distributed import Ranks

    monkeypatch.setenv(f"ACCELERATE_USE_{kind}", "true")
    with pytest.raises(ValueError, match=rf"distributed_type {kind} is not used by PrefAlign.*MULTI_GPU"):
        Ranks.from_environment(cpu=True)
