"""The demo's verdict: it passes when the preferred attribute moves AND every prompted attribute stays within
5 points; constructed sample sets (renders with known attributes) stand in for the model's samples."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

import trainer.demo as demo
import trainer.run
import trainer.toy
from trainer.cli import main
from trainer.toy.world import COLOURS, random_spec, render, to_pil

SAMPLES = 96


def renders(prompts, shaded_share: float, wrong_colour_share: float) -> list:
    """One render per prompt: its shape, its colour except for the first `wrong_colour_share` of them (the next
    colour instead), shaded for the first `shaded_share` of them (by position in a fixed shuffled order)."""
    rng = np.random.default_rng(0)
    order = rng.permutation(len(prompts))
    images = []
    for rank, prompt in zip(np.argsort(order), prompts):
        words = prompt.split()
        colour, shape = words[1], words[2]
        if rank < wrong_colour_share * len(prompts):
            colour = COLOURS[(COLOURS.index(colour) + 1) % len(COLOURS)]
        style = "shaded" if rank < shaded_share * len(prompts) else "flat"
        images.append(to_pil(render(random_spec(rng, shape=shape, colour=colour, style=style))))
    return images


def fake_demo(monkeypatch, tmp_path, after_shaded: float, after_wrong_colour: float) -> tuple[int, dict, str]:
    """Run `python -m trainer demo` with training and sampling replaced: base samples 30% shaded, all faithful."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(b"")
    monkeypatch.setattr(trainer.run, "run", lambda config: SimpleNamespace(lora_path=lora, steps=3, metrics={}))
    monkeypatch.setattr(trainer.toy, "sample_images", lambda model, prompts, seeds, **kw: renders(prompts, 0.3, 0.0))
    monkeypatch.setattr(demo, "sample_with_lora",
                        lambda method, path, prompts, seeds, **kw: renders(prompts, after_shaded, after_wrong_colour))
    out = tmp_path / "demo"
    code = main(["demo", "--pairs", "2", "--samples", str(SAMPLES), "--output-dir", str(out)])
    return code, json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def test_demo_passes_when_the_preference_moves_and_fidelity_holds(monkeypatch, tmp_path):
    code, report, text = fake_demo(monkeypatch, tmp_path, after_shaded=0.9, after_wrong_colour=0.0)
    assert code == 0 and report["moved"] and report["fidelity_kept"] and report["passed"]
    assert report["fidelity"]["colour"]["before"]["rate"] == report["fidelity"]["colour"]["after"]["rate"] == 1.0
    assert set(report["fidelity"]) == {"colour", "shape"}  # what the prompts name when the style is open
    assert "| colour as prompted | 100.0% [" in text and "kept what the prompts ask for" in text


def test_demo_fails_when_fidelity_falls_more_than_5_points_while_the_preference_moves(monkeypatch, tmp_path):
    code, report, text = fake_demo(monkeypatch, tmp_path, after_shaded=0.9, after_wrong_colour=0.1)
    assert report["moved"] and not report["fidelity_kept"] and not report["passed"] and code == 1
    assert report["fidelity_falls"] == {"colour": pytest.approx(10 / SAMPLES)}
    assert "prompt fidelity fell more than 5 points (colour -10.4%)" in text


def test_a_fall_within_5_points_passes_and_no_move_fails(monkeypatch, tmp_path):
    code, report, _ = fake_demo(monkeypatch, tmp_path / "a", after_shaded=0.9, after_wrong_colour=0.04)
    assert code == 0 and report["passed"] and report["fidelity_falls"] == {}
    code, report, text = fake_demo(monkeypatch, tmp_path / "b", after_shaded=0.3, after_wrong_colour=0.0)
    assert code == 1 and not report["moved"] and "no significant change" in text
