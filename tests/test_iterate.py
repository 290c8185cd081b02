"""`python -m trainer iterate` on the toy world: two online rounds raise the judged score, and a run killed
(SIGKILL) inside round 2, in its pairs and then in its training, resumes to exactly the uninterrupted result."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from trainer import generate
from trainer.cli import main
from trainer.export import read_lora
from trainer.toy import open_prompts

ROOT = Path(__file__).resolve().parents[1]
PIPELINE_LOADS: list[str] = []  # the models the reference run loaded as sampling pipelines


def iterate_args(prompts: Path, out: Path) -> list[str]:
    return ["iterate", "--model", "toy", "--prompts", str(prompts), "--scorer", "attribute:shaded", "--rounds", "2",
            "--images-per-prompt", "8", "--policy", "all-pairs", "--sample-steps", "10", "--resolution", "32",
            "--batch-size", "8", "--learning-rate", "1e-3", "--rank", "8", "--alpha", "8", "--lr-warmup-steps", "5",
            "--max-steps", "60", "--checkpoint-every", "10", "--eval-samples", "160", "--output-dir", str(out)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Two uninterrupted rounds, in this process with one thread (as the subprocesses run: OMP_NUM_THREADS=1)."""
    tmp = tmp_path_factory.mktemp("iterate")
    (tmp / "prompts.txt").write_text("\n".join(open_prompts("shaded")) + "\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    load_pipeline = generate.load_pipeline

    def counted(model, *args, **kwargs):
        PIPELINE_LOADS.append(model)
        return load_pipeline(model, *args, **kwargs)

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(generate, "load_pipeline", counted)
            assert main(iterate_args(tmp / "prompts.txt", tmp / "run")) == 0
    finally:
        torch.set_num_threads(threads)
    return tmp


def test_two_rounds_raise_the_judged_score(reference, capsys):
    rows = json.loads((reference / "run" / "rounds.json").read_text())
    assert [r["round"] for r in rows] == [0, 1, 2]
    base, first, second = (r["judges"][0] for r in rows)
    assert base["name"] == first["name"] == "attribute:shaded" and first["labelled"]
    # training on round 1's pairs (`trainer pairs` + `train` on the base model) moves the toy model: the LoRA's
    # shaded rate clears the base model's, 95% Wilson intervals apart, as in the demo; round 2 moves it further
    assert first["after"]["low"] > base["before"]["high"] and second["after"]["low"] > base["before"]["high"]
    assert second["mean_lora"] > first["mean_lora"] > base["mean_base"]
    assert first["win_rate"]["low"] > 0.5 and second["win_rate"]["low"] > 0.5
    assert rows[1]["pairs"] > 0 and rows[2]["pairs"] > 0
    # one pipeline serves an evaluation and the next round's pairs: loaded 1 + rounds times, let go for training
    assert PIPELINE_LOADS == ["toy"] * 3
    table = (reference / "run" / "rounds.md").read_text()
    assert "| 2 | " in table and "attribute:shaded (labelled)" in table
    # round 2 generated with round 1's LoRA, on seeds of its own
    manifest = json.loads((reference / "run" / "round-2" / "pairs" / "pairs.json").read_text())
    assert manifest["settings"]["lora"] == str(reference / "run" / "round-1" / "train" / "lora.safetensors")
    assert manifest["settings"]["seed"] == 12 * 8
    # round 2's training continued round 1's LoRA (the reference is the base model, adapter off)
    meta = pq.read_schema(sorted((reference / "run" / "round-2" / "pairs").glob("*.parquet"))[0]).metadata
    assert json.loads(meta[b"prefalign.pairs"])["lora"] == manifest["settings"]["lora"]


def launch(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 600.0) -> str:
    """SIGKILL the run once `ready()`; returns what it wrote to stderr (its progress bars)."""
    end = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"iterate exited early ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return proc.stderr.read().decode(errors="replace")


def test_resume_after_kills_inside_round_2_is_exact(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference / "run", run)
    # back to the boundary after round 1, as a run stopped there would have left it
    shutil.rmtree(run / "round-2")
    state = json.loads((run / "iterate.json").read_text())
    del state["rounds"]["2"]
    (run / "iterate.json").write_text(json.dumps(state))
    args = [*iterate_args(reference / "prompts.txt", run), "--resume", "latest"]
    pairs = run / "round-2" / "pairs" / "pairs.json"

    def pairs_done(n: int) -> bool:
        try:
            return json.loads(pairs.read_text())["next_prompt"] >= n
        except (OSError, ValueError):
            return False

    kill_when(launch(args), lambda: pairs_done(3))  # inside round 2's pairs
    assert not json.loads(pairs.read_text())["done"]
    checkpoint = run / "round-2" / "train" / "checkpoints" / "step-10"
    log = kill_when(launch(args), checkpoint.is_dir)  # inside round 2's training
    first = re.search(r"pairs:\s+\d+%\|[^|]*\| (\d+)/12", log)
    assert first and int(first.group(1)) >= 3, log[-1000:]  # pairs went on after the last finished prompt
    assert not (run / "round-2" / "eval.json").exists()
    proc = launch(args)
    log = proc.communicate(timeout=900)[1].decode(errors="replace")
    assert proc.returncode == 0, log[-2000:]
    first = re.search(r"training:\s+\d+%\|[^|]*\| (\d+)/60", log)
    assert first and int(first.group(1)) >= 10, log[-1000:]  # training went on from its checkpoint
    assert not re.search(r"pairs:\s+\d+%", log)  # the round's pairs were complete
    for name in ("round-2/train/lora.safetensors", "round-1/train/lora.safetensors"):
        ours, theirs = load_file(str(run / name)), load_file(str(reference / "run" / name))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
        metrics = [json.loads(read_lora(folder / name)[1]["prefalign.metrics"]) for folder in (run, reference / "run")]
        assert metrics[0] == metrics[1]
    assert json.loads((run / "rounds.json").read_text()) == json.loads((reference / "run" / "rounds.json").read_text())
    for shard in sorted((reference / "run" / "round-2" / "pairs").glob("*.parquet")):
        assert pq.read_table(run / "round-2" / "pairs" / shard.name).equals(pq.read_table(shard))


def test_a_round_leaves_its_ranks_after_training_and_after_an_error(tmp_path, monkeypatch):
    import trainer.loop
    import trainer.run
    from trainer.config import make_config
    from trainer.distributed import Ranks
    from trainer.iterate import train_round
    from trainer.loop import TrainResult

    closed, failing = [], []

    class Counted(Ranks):
        def close(self) -> None:
            closed.append(True)
            super().close()

    def train(config, backend, examples, hooks, ranks):
        if failing:
            raise RuntimeError("training failed")
        return TrainResult(1, {}, Path(config.output_dir), Path(config.output_dir) / "l", False)

    monkeypatch.setattr(trainer.run, "make_ranks", lambda: Counted.single("cpu"))
    monkeypatch.setattr(trainer.run, "make_backend", lambda config, device: object())
    monkeypatch.setattr(trainer.run, "open_config_examples", lambda config: [])
    monkeypatch.setattr(trainer.loop, "train", train)
    config = make_config({"model": "toy", "data": "unused", "output_dir": str(tmp_path), "max_steps": 1})
    assert train_round(config, tmp_path / "pairs", tmp_path / "round", None) == tmp_path / "round" / "l"
    assert closed == [True]
    failing.append(True)
    with pytest.raises(RuntimeError, match="training failed"):
        train_round(config, tmp_path / "pairs", tmp_path / "round", None)
    assert closed == [True, True]


def test_iterate_refuses_bad_input_before_writing(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a red circle\n")
    base = ["iterate", "--model", "toy", "--prompts", str(tmp_path / "p.txt"), "--scorer", "attribute:shaded"]
    out = tmp_path / "out"
    cases = [
        ([*base, "--output-dir", str(out), "--data", "x"], "--data"),
        ([*base], "--output-dir"),
        ([*base, "--output-dir", str(out), "--rounds", "0"], "--rounds"),
        ([*base, "--output-dir", str(out), "--policy", "contrast", "--chosen-template", "{} x",
          "--rejected-template", "{}"], "iterate needs a score policy"),
        ([*base, "--output-dir", str(out), "--resume", "somewhere"], "--resume latest"),
        ([*base, "--output-dir", str(out), "--method", "nope"], "nope"),
    ]
    for args, needle in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, (args, err)
        assert not out.exists()


def test_iterate_folder_belongs_to_one_run(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a red circle\n")
    args = ["iterate", "--model", "toy", "--prompts", str(tmp_path / "p.txt"), "--scorer", "attribute:shaded"]
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "iterate.json").write_text(json.dumps({"format": "prefalign-iterate/1", "rounds": {},
                                                     "settings": {"model": "toy", "method": "kto"}}))
    assert main([*args, "--output-dir", str(theirs)]) == 2
    assert "holds an iterate run with other settings (" in capsys.readouterr().err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert main([*args, "--output-dir", str(mine)]) == 2
    assert "not empty and not the folder of an iterate run" in capsys.readouterr().err
    assert sorted(p.name for p in theirs.iterdir()) == ["iterate.json"] and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
