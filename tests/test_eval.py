"""`python -m trainer eval`: ties reported as ties, several judges, which judge labelled the pairs, the CLI."""
from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest

from trainer.cli import main
from trainer.evaluate import prompt_seeds, rate, rate_text, win_rate
from trainer.toy import has_attribute, sample_images, write_preference_dataset


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval written out independently (Wilson 1927, eq. for p +- z)."""
    p = k / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def test_win_rate_is_over_decided_pairs_and_ties_are_their_own_share():
    w = win_rate([3.0, 1.0, 2.0, 2.5], [1.0, 2.0, 2.0, 0.0])
    assert (w.wins, w.ties, w.losses, w.n, w.decided) == (2, 1, 1, 4, 3)
    assert w.rate == pytest.approx(2 / 3) and (w.low, w.high) == pytest.approx(wilson(2, 3))
    assert (w.tie_share.rate, w.tie_share.low, w.tie_share.high) == pytest.approx((0.25, *wilson(1, 4)))
    # the example: 36 wins, 59 ties, 1 loss is a win, not a 37.5% "win rate"
    w = win_rate([1.0] * 36 + [0.0] * 59 + [0.0], [0.0] * 36 + [0.0] * 59 + [1.0])
    assert w.rate == pytest.approx(36 / 37) and w.low > 0.5
    assert (w.win_share.rate, w.tie_share.rate, w.loss_share.rate) == pytest.approx((36 / 96, 59 / 96, 1 / 96))
    w = win_rate([1.0, 2.0], [1.0, 2.0])
    assert w.rate is None and (w.low, w.high) == (0.0, 1.0) and w.ties == 2
    r = rate([1, 0, 0, 0, 1, 0, 0, 0, 0, 0])
    assert (r.hits, r.n, r.rate) == (2, 10, 0.2) and (r.low, r.high) == pytest.approx(wilson(2, 10))
    with pytest.raises(ValueError):
        win_rate([1.0], [1.0, 2.0])


def test_evaluation_samples_cycle_the_prompts_on_consecutive_seeds_and_rates_print_with_intervals():
    from trainer.demo import evaluation_set
    from trainer.iterate import table
    from trainer.toy import open_prompts

    assert prompt_seeds(["a", "b", "c"], 5, 7) == (["a", "b", "c", "a", "b"], [7, 8, 9, 10, 11])
    prompts = open_prompts("shaded")
    assert evaluation_set("shaded", len(prompts) + 1, 3) == ([*prompts, prompts[0]], list(range(3, len(prompts) + 4)))
    low, high = wilson(3, 8)
    assert rate_text({"rate": 3 / 8, "low": low, "high": high}) == "37.5% [13.7%, 69.4%]"
    w = asdict(win_rate([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.5] * 8))
    judge = {"name": "j", "labelled": False, "mean_lora": 0.375, "win_rate": w}
    assert "| 1 | 4 | j | 0.375 | 37.5% [13.7%, 69.4%] | 3 / 0 / 5 |" in table([{"round": 1, "pairs": 4, "judges": [judge]}])


@pytest.fixture(scope="module")
def toy_lora(tmp_path_factory):
    """A briefly trained toy LoRA (its quality does not matter here)."""
    from trainer.config import make_config
    from trainer.demo import DEMO_TRAINING
    from trainer.run import run

    tmp = tmp_path_factory.mktemp("lora")
    data = write_preference_dataset(tmp / "data", "shaded", 8, seed=0)
    config = make_config({**DEMO_TRAINING, "data": str(data), "method": "sft", "max_steps": 3, "batch_size": 4,
                          "output_dir": str(tmp / "run"), "cache_dir": str(tmp / "cache")})
    return str(run(config).lora_path)


def test_eval_cli_attribute_scorer_matches_independent_sampling(tmp_path, toy_lora, capsys, monkeypatch):
    from trainer import export

    out = tmp_path / "eval"
    read, read_lora = [], export.read_lora
    monkeypatch.setattr(export, "read_lora", lambda path: read.append(str(path)) or read_lora(path))
    assert main(["eval", "--lora", toy_lora, "--samples", "6", "--steps", "4", "--seed", "50",
                 "--output-dir", str(out)]) == 0
    assert read == [toy_lora]  # its metadata (labellers, placement) is read from one read of the file
    report = json.loads((out / "eval.json").read_text())
    assert (out / "grid.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "win rate" in printed and f"wrote {out / 'eval.json'}" in printed
    assert report["seeds"] == list(range(50, 56)) and report["samples"] == 6
    base = sample_images(None, report["prompts"], report["seeds"], steps=4)
    tuned = sample_images(None, report["prompts"], report["seeds"], steps=4, lora=toy_lora)
    b = [has_attribute(im, "shaded") for im in base]
    a = [has_attribute(im, "shaded") for im in tuned]
    (result,) = report["results"]
    assert result["name"] == "attribute:shaded"
    assert result["labelled"] is None  # trained on a pairs.jsonl folder: nobody recorded a judge
    assert result["scores"] == {"base": [float(x) for x in b], "lora": [float(x) for x in a]}
    assert result["win_rate"]["wins"] == sum(x and not y for x, y in zip(a, b))
    assert result["win_rate"]["ties"] == sum(x == y for x, y in zip(a, b))
    assert result["before"]["hits"] == sum(b) and result["after"]["hits"] == sum(a)


def test_eval_cli_clip_and_style_scorers(tmp_path, toy_lora, tiny_clip, monkeypatch):
    from trainer.scorers import ClipModel

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    loaded, load = [], ClipModel.__init__

    def counted(self, location, **kwargs):
        loaded.append(location)
        load(self, location, **kwargs)

    monkeypatch.setattr(ClipModel, "__init__", counted)
    for scorer in ("clip", "style"):
        out = tmp_path / scorer
        loaded.clear()
        assert main(["eval", "--lora", toy_lora, "--scorer", scorer, "--scorer-model", tiny_clip, "--prompts",
                     str(prompts), "--samples", "3", "--steps", "3", "--prompt-clip", tiny_clip,
                     "--output-dir", str(out)]) == 0
        assert loaded == [tiny_clip]  # --prompt-clip shares the judge's CLIP: loaded once
        report = json.loads((out / "eval.json").read_text())
        assert report["prompt_alignment"]["model"] == tiny_clip
        assert report["prompts"] == ["a red circle", "a blue square", "a red circle"]
        (result,) = report["results"]
        w = result["win_rate"]
        lora, base = result["scores"]["lora"], result["scores"]["base"]
        assert w["wins"] == sum(x > y for x, y in zip(lora, base))
        assert w["losses"] == sum(x < y for x, y in zip(lora, base))
        assert w["wins"] + w["ties"] + w["losses"] == 3
        assert ("after" in result) == (scorer == "style")


@pytest.fixture(scope="module")
def pairs_lora(tmp_path_factory):
    """A toy LoRA trained for two steps on pairs `trainer pairs` labelled with the toy classifier."""
    tmp = tmp_path_factory.mktemp("pairs_lora")
    (tmp / "prompts.txt").write_text("a red circle\na blue square\na green triangle\n")
    assert main(["pairs", "--model", "toy", "--prompts", str(tmp / "prompts.txt"), "--scorer", "attribute:shaded",
                 "--images-per-prompt", "6", "--policy", "all-pairs", "--sample-steps", "4",
                 "--output-dir", str(tmp / "pairs")]) == 0
    assert main(["train", "--model", "toy", "--data", str(tmp / "pairs"), "--resolution", "32", "--batch-size", "2",
                 "--max-steps", "2", "--checkpoint-every", "0", "--output-dir", str(tmp / "run"),
                 "--cache-dir", str(tmp / "cache")]) == 0
    return str(tmp / "run" / "lora.safetensors")


def test_eval_marks_the_judge_that_labelled_the_training_pairs(tmp_path, pairs_lora, tiny_clip, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--lora", pairs_lora, "--scorer", "attribute:shaded", "--scorer", f"clip:{tiny_clip}",
                 "--samples", "4", "--steps", "3", "--output-dir", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert [(r["name"], r["labelled"]) for r in report["results"]] == [
        ("attribute:shaded", True), (f"clip:{tiny_clip}", False)]
    assert report["labellers"][0]["name"] == "attribute:shaded"
    printed = capsys.readouterr().out
    assert "attribute:shaded (labelled the training pairs)" in printed
    assert f"clip:{tiny_clip} (did not label the training pairs)" in printed
    assert main(["eval", "--lora", pairs_lora, "--samples", "2", "--steps", "2", "--output-dir", str(out)]) == 0
    assert "also judge with a scorer that did not label them" in capsys.readouterr().out


def test_eval_cli_errors(tmp_path, toy_lora, capsys):
    assert main(["eval", "--lora", str(tmp_path / "missing.safetensors")]) == 2
    assert main(["eval", "--lora", toy_lora, "--scorer", "clip"]) == 2
    assert main(["eval", "--lora", toy_lora, "--scorer", "pickscore"]) == 2
    assert main(["eval", "--lora", toy_lora, "--attribute", "purple"]) == 2
    assert main(["eval", "--lora", toy_lora, "--prompts", str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err
    assert "unknown kind 'pickscore'" in err and "Traceback" not in err
