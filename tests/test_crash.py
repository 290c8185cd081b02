"""Crash safety: kill -9 then --resume gives the uninterrupted result; writes are atomic; a full disk is survivable."""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from trainer import atomic
from trainer.checkpoint import (TrainingState, list_checkpoints, load_checkpoint, resolve_resume,
                                save_checkpoint)
from trainer.loop import train
from trainer.metrics import MetricsLog
from trainer.run import make_backend

ROOT = Path(__file__).resolve().parents[1]


def backend_for(config):
    torch.manual_seed(config.seed)
    return make_backend(config, torch.device("cpu"))


def assert_same_lora(a: Path, b: Path, note: str = "") -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    for key in x:
        assert torch.equal(x[key], y[key]), f"{key} {note}"


# --- kill -9 -----------------------------------------------------------------------------------

STEPS = 8
CONFIG = f"""
model = "tiny-sd"
data = "tiny"
resolution = 32
batch_size = 2
max_steps = {STEPS}
learning_rate = 1e-3
rank = 4
alpha = 4.0
checkpoint_every = 1
keep_checkpoints = 2
seed = 0
"""


def cli(config: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "trainer", "train", "--config", str(config), "--output-dir", str(out),
                             "--cache-dir", str(out.parent / f"cache-{out.name}"), *extra],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.02)


def kill9(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-3000:]


def test_sigkill_at_a_random_moment_then_resume_gives_the_uninterrupted_lora(tmp_path):
    """`kill -9` at a random moment after the second checkpoint (between steps, mid-step or mid-save),
    then `--resume latest`: the LoRA is bit-identical to an uninterrupted run's."""
    from trainer.config import load_toml, make_config
    from trainer.data.tiny import write_tiny_dataset
    from trainer.models.tiny import cache_root, tiny_model_path
    from trainer.run import run

    write_tiny_dataset(cache_root() / "data" / "tiny")  # built once here, not by two processes at the same time
    tiny_model_path("tiny-sd")
    config = tmp_path / "run.toml"
    config.write_text(CONFIG)
    crashed = tmp_path / "crashed"
    ckpts = crashed / "checkpoints"

    first = cli(config, crashed)
    wait_for(lambda: len(list_checkpoints(ckpts)) >= 1, first)
    start = time.monotonic()
    wait_for(lambda: len(list_checkpoints(ckpts)) >= 2, first)
    step_time = time.monotonic() - start
    delay = random.uniform(0.0, 3 * step_time)  # somewhere in the next three steps (and their saves)
    time.sleep(delay)
    kill9(first)
    reached = int(list_checkpoints(ckpts)[-1].name.split("-")[1])
    assert reached < STEPS, "the run finished before it was killed"

    second = cli(config, crashed, "--resume", "latest")
    straight = tmp_path / "straight"  # the uninterrupted run, in this process meanwhile
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocesses (OMP_NUM_THREADS=1): the same float reduction order
    try:
        run(make_config({**load_toml(config), "output_dir": str(straight), "cache_dir": str(tmp_path / "cache-straight")}))
    finally:
        torch.set_num_threads(threads)
    finish(second)
    assert_same_lora(straight / "lora.safetensors", crashed / "lora.safetensors", f"(killed {delay:.3f}s after step-2)")
    steps = [json.loads(line)["step"] for line in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), (delay, steps)
    assert not [p for p in crashed.rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert [p.name for p in list_checkpoints(ckpts)] == [f"step-{STEPS - 1}", f"step-{STEPS}"]


# --- atomic checkpoints --------------------------------------------------------------------------

def small_state(step: int) -> TrainingState:
    g = torch.Generator().manual_seed(step)
    return TrainingState(step, {"a.lora_A.default.weight": torch.randn(4, 8, generator=g)},
                         {"state": {0: {"exp_avg": torch.randn(4, 8, generator=g), "step": torch.tensor(float(step))}},
                          "param_groups": [{"lr": 1e-3, "params": [0]}]},
                         {"last_epoch": step}, g.get_state(), {"epoch": 0, "index": step})


def test_half_written_checkpoint_is_never_picked_as_latest(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        save_checkpoint(root, small_state(step), keep=5)
    # what a kill can leave: a temp folder being built, a folder half-deleted by pruning ...
    (root / ".step-3.tmp").mkdir()
    (root / ".step-3.tmp" / "adapter.safetensors").write_bytes(b"partial")
    (root / ".step-1.old").mkdir()
    # ... and what a damaged disk can leave: a step folder whose files do not match state.json
    save_checkpoint(root, small_state(4), keep=5)
    with open(root / "step-4" / "adapter.safetensors", "r+b") as f:
        f.truncate(20)
    (root / "step-5").mkdir()
    (root / "step-5" / "adapter.safetensors").write_bytes(b"x")

    assert [p.name for p in list_checkpoints(root)] == ["step-1", "step-2"]
    assert resolve_resume("latest", root).name == "step-2"
    with pytest.raises(ValueError, match=r"step-4 is not a complete checkpoint .*adapter.safetensors has 20 bytes"):
        resolve_resume(str(root / "step-4"), root)
    state = load_checkpoint(resolve_resume("latest", root))
    assert state.step == 2 and torch.equal(state.adapter["a.lora_A.default.weight"],
                                           small_state(2).adapter["a.lora_A.default.weight"])

    save_checkpoint(root, small_state(3), keep=2)  # the next save clears the leftovers and prunes by renaming away
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-3", "step-4", "step-5"]
    assert [p.name for p in list_checkpoints(root)] == ["step-2", "step-3"]


def test_damaged_checkpoint_gives_a_clear_error(tmp_path):
    root = tmp_path / "checkpoints"
    folder = save_checkpoint(root, small_state(1), keep=1)
    body = json.loads((folder / "state.json").read_text())
    (folder / "state.safetensors").write_bytes(b"\0" * body["files"]["state.safetensors"])  # same size, garbage
    with pytest.raises(ValueError, match="step-1 is damaged"):
        load_checkpoint(folder)


def test_torn_metrics_line_is_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.7}\n{"step": 2, "loss": 0.6}\n{"step": 3, "lo')  # killed mid-line
    log = MetricsLog(path, enabled=True, after_step=2)
    log.write(3, {"loss": 0.5})
    log.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


# --- a full disk ---------------------------------------------------------------------------------

def disk_full_after(nbytes: int, native: bool = False):
    """A writer that writes `nbytes` and then fails like a full disk (OSError, or safetensors' own error)."""
    def fail(path) -> None:
        with open(path, "wb") as f:
            f.write(b"\0" * nbytes)
        if native:
            raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                               'message: "No space left on device" })')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return fail


@pytest.mark.parametrize("native", [False, True])
def test_disk_full_keeps_the_previous_file_and_says_so(tmp_path, monkeypatch, native):
    target = tmp_path / "lora.safetensors"
    atomic.save_safetensors(target, {"w": torch.ones(3)})
    before = target.read_bytes()
    monkeypatch.setattr(atomic, "save_file", lambda tensors, path, metadata=None: disk_full_after(10, native)(path))
    with pytest.raises(OSError, match=r"disk full while writing .*lora.safetensors; the previous file is intact") as e:
        atomic.save_safetensors(target, {"w": torch.zeros(3)})
    assert e.value.errno == errno.ENOSPC
    assert target.read_bytes() == before
    monkeypatch.setattr(atomic, "_write_file", lambda path, data: disk_full_after(3)(path))
    with pytest.raises(OSError, match="the previous file is intact"):
        atomic.write_text(target, "new")
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]  # no temp files left


def test_disk_full_during_training_keeps_the_last_checkpoint_and_resume_continues(tmp_path, monkeypatch, pairs):
    straight = tiny_config(tmp_path / "a", max_steps=4)
    train(straight, backend_for(straight), pairs)

    config = tiny_config(tmp_path / "b", max_steps=4, checkpoint_every=1)
    real_save = atomic.save_file

    def save_file(tensors, path, metadata=None):
        if ".step-3.tmp" in str(path):
            return disk_full_after(100)(path)
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(atomic, "save_file", save_file)
    with pytest.raises(OSError, match=r"disk full while saving checkpoint .*step-3; the latest checkpoint "
                                      r".*step-2 is intact.*--resume latest"):
        train(config, backend_for(config), pairs)
    root = tmp_path / "b" / "out" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-1", "step-2"]

    monkeypatch.setattr(atomic, "save_file", real_save)  # space freed
    resumed = tiny_config(tmp_path / "b", max_steps=4, checkpoint_every=1, resume="latest")
    train(resumed, backend_for(resumed), pairs)
    assert_same_lora(tmp_path / "a" / "out" / "lora.safetensors", tmp_path / "b" / "out" / "lora.safetensors")


def test_written_files_get_ordinary_permissions(tmp_path, monkeypatch):
    """The umask's mode, also for safetensors files (the library re-creates the temp file as 0600)."""
    monkeypatch.setattr(atomic, "FILE_MODE", 0o640)  # what umask 027 gives
    atomic.write_text(tmp_path / "config.toml", "x = 1")
    atomic.save_safetensors(tmp_path / "lora.safetensors", {"w": torch.ones(3)})
    for name in ("config.toml", "lora.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name
