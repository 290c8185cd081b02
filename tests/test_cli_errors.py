"""Bad input to `python -m trainer`: one line on stderr naming the option, path or row; exit code 2;
no traceback; and nothing written (a finished run in the output folder stays exactly as it was)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import png
from trainer.cli import main

TINY = ["--model", "tiny-sd", "--resolution", "32", "--batch-size", "2", "--max-steps", "1", "--checkpoint-every", "0"]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with a hash of its bytes (empty if the folder does not exist)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(capsys, code: int, *names: str) -> str:
    """The one-line error, last on stderr (after notes such as "overwrite: ..."): exit 2, `error: ...`
    naming each of `names`, no traceback."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert [line for line in lines if line.startswith("error")] == lines[-1:], err
    for name in names:
        assert name in lines[-1], (name, lines[-1])
    return lines[-1]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 1-step run: bad starts into a copy of its folder must leave every file as it was."""
    root = tmp_path_factory.mktemp("finished")
    assert main(["train", *TINY, "--data", "tiny", "--output-dir", str(root / "out"),
                 "--cache-dir", str(root / "cache")]) == 0
    return root / "out"


@pytest.fixture
def run_folder(finished_run, tmp_path) -> Path:
    folder = tmp_path / "out"
    shutil.copytree(finished_run, folder)
    return folder


def train(folder: Path, *extra: str) -> int:
    return main(["train", *TINY, "--output-dir", str(folder), "--cache-dir", str(folder.parent / "cache"), *extra])


def pairs_folder(folder: Path, missing_line: int | None = None) -> Path:
    """A pairs.jsonl folder of 4 pairs; row `missing_line` names a rejected image that does not exist."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(4):
        for role, colour in (("chosen", (200, 20, 20)), ("rejected", (20, 20, 200))):
            (folder / f"{i}_{role}.png").write_bytes(png(rng, colour))
        rows.append({"prompt": f"a square {i}", "chosen": f"{i}_chosen.png",
                     "rejected": "gone.png" if i + 1 == missing_line else f"{i}_rejected.png"})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


# --- 1: data that is not there ------------------------------------------------------------------

@pytest.mark.parametrize("data", ["missing", "empty", "toyy", "./no/such/data"])
def test_data_that_does_not_exist_names_the_path(run_folder, tmp_path, capsys, monkeypatch, data):
    import datasets

    def never(*args, **kwargs):
        raise AssertionError("datasets was called for a local path")

    monkeypatch.setattr(datasets, "load_dataset", never)
    path = {"missing": str(tmp_path / "nope"), "empty": str(tmp_path / "empty")}.get(data, data)
    (tmp_path / "empty").mkdir()
    before = snapshot(run_folder)
    line = error_line(capsys, train(run_folder, "--data", path), "--data: ", path)
    assert ("the folder is empty" if data == "empty" else "no such file or folder") in line
    assert snapshot(run_folder) == before


def test_data_hub_id_offline_says_it_needs_a_download(tmp_path, capsys):
    error_line(capsys, train(tmp_path / "out", "--data", "someone/no-such-data"),
               "someone/no-such-data", "HF_HUB_OFFLINE", "need a download")
    assert not (tmp_path / "out").exists()


# --- 2: a pairs.jsonl row naming a missing image -------------------------------------------------

def test_missing_image_names_the_row_and_role(run_folder, tmp_path, capsys):
    """The cache reads every image before training starts: even with --overwrite, the failed start
    leaves the finished run in the folder alone."""
    data = pairs_folder(tmp_path / "data", missing_line=2)
    before = snapshot(run_folder)
    error_line(capsys, train(run_folder, "--data", str(data), "--overwrite"),
               f"{data / 'pairs.jsonl'} line 2 (rejected image)", "cannot read", "gone.png")
    assert snapshot(run_folder) == before


def test_missing_image_without_the_cache_names_the_row_and_role(tmp_path, capsys):
    """Per-step encoding meets the row when the sampler draws it (2 steps of 2 pairs: all 4 rows)."""
    data = pairs_folder(tmp_path / "data", missing_line=2)
    error_line(capsys, train(tmp_path / "out", "--data", str(data), "--no-cache", "--max-steps", "2"),
               f"{data / 'pairs.jsonl'} line 2 (rejected image)", "gone.png")


def test_missing_image_is_skipped_and_counted_on_the_cached_path(tmp_path, capsys):
    data = pairs_folder(tmp_path / "data", missing_line=2)
    out = tmp_path / "out"
    assert train(out, "--data", str(data), "--skip-bad-rows") == 0
    assert "bad rows skipped 1" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["data"] == {"rows_read": 4, "ties_dropped": 0,
                                                                       "bad_rows_skipped": 1}


# --- 3: a model that is not there -----------------------------------------------------------------

@pytest.mark.parametrize("model", ["toyy", "./no/such/model", "owner/.model"])
def test_model_typo_or_missing_path_is_named_at_once(run_folder, capsys, model):
    before = snapshot(run_folder)
    line = error_line(capsys, train(run_folder, "--data", "tiny", "--model", model), "--model: ", model)
    assert "no such file or folder" in line and "not a hub id" in line
    assert snapshot(run_folder) == before


def test_model_hub_id_offline_or_unreachable_says_it_needs_a_download(tmp_path, capsys, monkeypatch):
    import trainer.hub

    error_line(capsys, train(tmp_path / "out", "--data", "tiny", "--model", "someone/no-such-model"),
               "someone/no-such-model", "HF_HUB_OFFLINE", "need a download")
    calls = []

    class NoNetwork:
        def head(self, url, **kwargs):
            calls.append(url)
            raise ConnectionError("no route to host")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(trainer.hub, "get_session", lambda: NoNetwork())
    error_line(capsys, train(tmp_path / "out", "--data", "tiny", "--model", "someone/no-such-model"),
               "cannot reach", "need a download")
    assert len(calls) == 1  # asked once, not retried for half a minute
    assert not (tmp_path / "out").exists()


# --- 4: an option whose package is not installed --------------------------------------------------

def test_tensorboard_without_the_extra_says_how_to_install_it(run_folder, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    before = snapshot(run_folder)
    error_line(capsys, train(run_folder, "--data", "tiny", "--tensorboard"),
               "--tensorboard: ", 'pip install "prefalign[tensorboard]"')
    assert snapshot(run_folder) == before


# --- 5: bad values, checked before anything loads --------------------------------------------------

@pytest.mark.parametrize("flag, value, key", [
    ("--learning-rate", "-1", "--learning-rate: "), ("--learning-rate", "nan", "--learning-rate: "),
    ("--adam-beta1", "1.5", "--adam-beta1: "), ("--alpha", "0", "--alpha: "),
    ("--seed", "-1", "--seed: "), ("--num-workers", "-2", "--num-workers: "),
    ("--max-examples", "0", "--max-examples: "), ("--max-grad-norm", "-0.5", "--max-grad-norm: "),
    ("--weight-decay", "inf", "--weight-decay: "), ("--method-args", "beta=abc", "method_args.beta"),
    ("--method", "dpoo", "unknown method 'dpoo'"),
])
def test_bad_value_stops_before_the_run_folder_is_touched(run_folder, capsys, monkeypatch, flag, value, key):
    """Used to be caught by the optimiser 8 s in, after config.toml was rewritten (`learning_rate = -1.0`
    beside a LoRA trained at 1e-3)."""
    import trainer.run

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the values were checked")

    monkeypatch.setattr(trainer.run, "make_backend", no_loading)
    before = snapshot(run_folder)
    error_line(capsys, train(run_folder, "--data", "tiny", flag, value), key)
    assert snapshot(run_folder) == before


def test_a_bad_value_is_named_as_the_user_wrote_it(run_folder, tmp_path, capsys):
    """Typed as a flag, the message names the flag; from a TOML config file, the file's key."""
    config = tmp_path / "run.toml"
    config.write_text("learning_rate = -1.0\n")
    line = error_line(capsys, train(run_folder, "--data", "tiny", "--config", str(config)), "config key 'learning_rate'")
    assert "--learning-rate" not in line
    line = error_line(capsys, train(run_folder, "--data", "tiny", "--learning-rate=-1"), "error: --learning-rate: ")
    assert "config key" not in line


def test_eval_scorer_model_errors_name_the_option(tmp_path, capsys):
    lora = tmp_path / "x.safetensors"
    lora.write_bytes(b"")  # only its existence is checked before the scorer
    argv = ["eval", "--lora", str(lora), "--scorer", "clip", "--output-dir", str(tmp_path / "eval"), "--scorer-model"]
    line = error_line(capsys, main([*argv, "someone/clip"]), "--scorer-model", "HF_HUB_OFFLINE")
    assert "embedder" not in line
    (tmp_path / "not-clip").mkdir()
    line = error_line(capsys, main([*argv, str(tmp_path / "not-clip")]), "--scorer-model", "cannot load a CLIP model")
    assert "embedder" not in line
    assert not (tmp_path / "eval").exists()
