"""A run folder belongs to one run; Ctrl-C saves and says how to continue; what a run records (data counts,
resolved method hyper-parameters, file permissions); the demo keeps attributes apart."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from trainer.cli import main
from trainer.config import tomllib
from trainer.data.synthetic import pickapic_rows, write_parquet

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny-sd", "--data", "tiny", "--resolution", "32", "--batch-size", "2", "--checkpoint-every", "1"]


def train(out: Path, *extra: str) -> int:
    return main(["train", *TINY, "--output-dir", str(out), "--cache-dir", str(out.parent / "cache"), *extra])


def metadata(out: Path) -> dict[str, str]:
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        return f.metadata()


def files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


# --- 7, 10: a folder holds one run --------------------------------------------------------------

def test_a_different_run_into_a_finished_run_folder_is_refused_naming_the_keys(tmp_path, capsys):
    out = tmp_path / "out"
    assert train(out, "--max-steps", "2") == 0
    before = files(out)
    capsys.readouterr()
    assert train(out, "--max-steps", "2", "--method", "sft", "--learning-rate", "0.01") == 2
    err = capsys.readouterr().err
    assert 'method: "dpo" -> "sft"' in err and "learning_rate: 0.0001 -> 0.01" in err and "--overwrite" in err
    assert err.count("\n") == 1
    assert files(out) == before  # LoRA, metrics, config.toml and checkpoints untouched
    # the same run again: continue it or start afresh, never mix
    assert train(out, "--max-steps", "2") == 2
    assert "already holds this run (checkpoint step-2); continue it with --resume latest" in capsys.readouterr().err
    assert files(out) == before
    # a resume that changes the result stops; one that only trains longer continues
    assert train(out, "--max-steps", "3", "--resume", "latest", "--learning-rate", "0.01") == 2
    assert "error: --resume: " in capsys.readouterr().err and files(out) == before
    assert train(out, "--max-steps", "3", "--resume", "latest") == 0
    assert "resuming from" in capsys.readouterr().err
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_overwrite_replaces_the_old_run_once_the_new_one_starts(tmp_path, capsys):
    out = tmp_path / "out"
    assert train(out, "--max-steps", "3") == 0
    assert train(out, "--max-steps", "1", "--method", "sft", "--overwrite") == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]  # the dpo run's step-2/3 are gone
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    recorded = tomllib.loads((out / "config.toml").read_text())
    assert recorded["method"] == "sft" and "overwrite" not in recorded and "resume" not in recorded
    # a later `--resume latest` continues the sft run, not the dpo one
    assert train(out, "--max-steps", "2", "--method", "sft", "--resume", "latest") == 0
    assert metadata(out)["prefalign.method"] == "sft" and metadata(out)["prefalign.steps"] == "2"


def test_resume_latest_without_a_checkpoint_says_it_trains_from_scratch(tmp_path, capsys):
    out = tmp_path / "out"
    assert train(out, "--max-steps", "1", "--resume", "latest") == 0
    assert f"resume: no checkpoint in {out / 'checkpoints'}, so the run trains from scratch" in capsys.readouterr().err


def test_resuming_a_finished_run_keeps_its_metrics(tmp_path, capsys):
    out = tmp_path / "out"
    assert train(out, "--max-steps", "2") == 0
    summary, meta = json.loads((out / "summary.json").read_text()), metadata(out)
    assert summary["metrics"]["loss"] > 0
    assert train(out, "--max-steps", "2", "--resume", "latest") == 0
    assert "already reached step 2" in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text()) == summary
    assert metadata(out)["prefalign.metrics"] == meta["prefalign.metrics"]


# --- 6: Ctrl-C ----------------------------------------------------------------------------------

def test_ctrl_c_saves_at_the_step_boundary_and_prints_the_command_to_continue(tmp_path):
    out = tmp_path / "out"
    argv = ["train", *TINY, "--checkpoint-every", "1000", "--log-every", "1", "--max-steps", "1000",
            "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "trainer", *argv], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no training step within 300 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    last = stderr.strip().splitlines()[-1]
    step = int(last.split("stopped at step ")[1].split(";")[0])
    assert step >= 2 and [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{step}"]
    assert metadata(out)["prefalign.steps"] == str(step)
    assert json.loads((out / "summary.json").read_text())["stopped"] is True
    assert json.loads(metrics.read_text().splitlines()[-1])["step"] == step  # the steps since the last log too
    command = last.split("continue with: ")[1]
    assert command == shlex.join(["python", "-m", "trainer", *argv, "--resume", "latest"])
    # the printed command continues the run (stopped early again by a lower max_steps)
    assert main([*shlex.split(command)[3:], "--max-steps", str(step + 1)]) == 0
    assert metadata(out)["prefalign.steps"] == str(step + 1)


# --- 11: bad rows and ties on the default (cached) path ---------------------------------------------

def test_cached_path_skips_bad_rows_and_counts_ties(tmp_path, capsys):
    rows = pickapic_rows(10, size=32, tie_every=5)  # rows 4 and 9 are ties
    rows[2]["jpg_1"] = b"not an image"
    data = write_parquet(tmp_path / "pairs.parquet", rows, row_group_size=5)
    out = tmp_path / "out"
    argv = ["--data", str(data), "--max-steps", "1"]
    assert train(out, *argv) == 2
    assert f"{data} row 2 (rejected image): image does not decode" in capsys.readouterr().err
    assert train(out, *argv, "--skip-bad-rows") == 0
    assert "rows read 10, ties dropped 2, bad rows skipped 1" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["data"] == {"rows_read": 10, "ties_dropped": 2,
                                                                       "bad_rows_skipped": 1}


# --- 12, 13: what the files record ----------------------------------------------------------------

def test_files_get_the_umask_permissions_and_defaults_are_recorded(tmp_path, monkeypatch):
    from trainer import atomic

    monkeypatch.setattr(atomic, "FILE_MODE", 0o640)  # what umask 027 gives; mkstemp and safetensors give 0600
    out = tmp_path / "out"
    assert train(out, "--max-steps", "1", "--method-args", "loss_type=hinge") == 0
    for name in ("lora.safetensors", "config.toml", "summary.json", "checkpoints/step-1/adapter.safetensors"):
        assert (out / name).stat().st_mode & 0o777 == 0o640, name
    recorded = tomllib.loads((out / "config.toml").read_text())["method_args"]
    assert recorded == {"beta": 5000.0, "loss_type": "hinge", "space": "latent", "safeguard": False, "safeguard_mu": 0.9,
                        "adaptive_beta": False, "adaptive_beta_target": 0.2, "adaptive_beta_decay": 0.99,
                        "sft_weight": 0.0}
    assert json.loads(metadata(out)["prefalign.method_args"]) == recorded


# --- 9: the demo keeps each attribute's pairs --------------------------------------------------------

def test_demo_with_another_attribute_builds_its_own_pairs(tmp_path, capsys):
    from trainer.toy import has_attribute

    out = tmp_path / "demo"
    small = ["--pairs", "8", "--steps", "1", "--samples", "2", "--output-dir", str(out)]
    for attribute in ("shaded", "red"):
        main(["demo", "--attribute", attribute, *small])
        printed = capsys.readouterr().out
        assert f"toward '{attribute}'" in printed and "--resume" not in printed  # demo does not take --resume
    recorded = tomllib.loads((out / "run" / "config.toml").read_text())
    data = Path(recorded["data"])
    assert data.name == "red-8pairs-seed0" and (out / "data" / "shaded-8pairs-seed0" / "pairs.jsonl").exists()
    from PIL import Image

    for row in map(json.loads, (data / "pairs.jsonl").read_text().splitlines()):
        assert has_attribute(Image.open(data / row["chosen"]), "red")
        assert not has_attribute(Image.open(data / row["rejected"]), "red")
