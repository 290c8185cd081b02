"""`python -m trainer eval` beside the preference: prompt fidelity on toy prompts, prompt alignment (CLIP
text-image similarity) for any model, and an npo LoRA sampled in the negative branch of guidance."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from trainer.cli import main
from trainer.toy import classify, sample_images, wilson_interval, write_preference_dataset

SAMPLES, STEPS = 8, 4


def train_toy(tmp_path_factory, method: str) -> str:
    """A briefly trained toy LoRA (its quality does not matter here)."""
    from trainer.config import make_config
    from trainer.demo import DEMO_TRAINING
    from trainer.run import run

    tmp = tmp_path_factory.mktemp(method)
    data = write_preference_dataset(tmp / "data", "shaded", 8, seed=0)
    config = make_config({**DEMO_TRAINING, "data": str(data), "method": method, "max_steps": 3, "batch_size": 4,
                          "output_dir": str(tmp / "run"), "cache_dir": str(tmp / "cache")})
    return str(run(config).lora_path)


@pytest.fixture(scope="module")
def dpo_lora(tmp_path_factory):
    return train_toy(tmp_path_factory, "dpo")


@pytest.fixture(scope="module")
def npo_lora(tmp_path_factory):
    return train_toy(tmp_path_factory, "npo")


def run_eval(tmp_path, *extra) -> dict:
    out = tmp_path / "eval"
    assert main(["eval", *extra, "--samples", str(SAMPLES), "--steps", str(STEPS), "--output-dir", str(out)]) == 0
    return json.loads((out / "eval.json").read_text())


def kept(images, prompts, kind: str) -> int:
    return sum(classify(im)[kind] == next(w for w in p.split() if w in {
        "colour": ("red", "green", "blue", "yellow"), "shape": ("circle", "square", "triangle")}[kind])
        for im, p in zip(images, prompts))


def test_eval_reports_prompt_fidelity_of_both_models(tmp_path, dpo_lora, capsys):
    report = run_eval(tmp_path, "--lora", dpo_lora)
    base = sample_images(None, report["prompts"], report["seeds"], steps=STEPS)
    tuned = sample_images(None, report["prompts"], report["seeds"], steps=STEPS, lora=dpo_lora)
    assert report["placement"] == "model" and set(report["fidelity"]["kinds"]) == {"colour", "shape"}
    for kind in ("colour", "shape"):
        for side, images in (("base", base), ("lora", tuned)):
            r, hits = report["fidelity"]["kinds"][kind][side], kept(images, report["prompts"], kind)
            assert r["rate"] == hits / SAMPLES and (r["low"], r["high"]) == pytest.approx(wilson_interval(hits, SAMPLES))
    printed = capsys.readouterr().out
    assert "prompt fidelity (toy classifier" in printed and "  colour: base " in printed
    assert report["fidelity"]["kept"] == (not report["fidelity"]["falls"])


def test_an_npo_lora_is_evaluated_in_the_negative_branch(tmp_path, npo_lora, dpo_lora, capsys):
    report = run_eval(tmp_path / "a", "--lora", npo_lora)
    assert report["placement"] == "negative" and "in the negative branch of guidance" in capsys.readouterr().out
    tuned = sample_images(None, report["prompts"], report["seeds"], steps=STEPS, negative_lora=npo_lora)
    flags = [float(classify(im)["style"] == "shaded") for im in tuned]
    assert report["results"][0]["scores"]["lora"] == flags
    # DPO + NPO: the positive LoRA on the model, the NPO LoRA in the negative branch
    both = run_eval(tmp_path / "b", "--lora", dpo_lora, "--negative-lora", npo_lora)
    tuned = sample_images(None, both["prompts"], both["seeds"], steps=STEPS, lora=dpo_lora, negative_lora=npo_lora)
    assert both["results"][0]["scores"]["lora"] == [float(classify(im)["style"] == "shaded") for im in tuned]
    assert main(["eval", "--lora", npo_lora, "--negative-lora", npo_lora, "--output-dir", str(tmp_path / "c")]) == 2
    assert "already goes into the negative branch" in capsys.readouterr().err
    assert main(["eval", "--lora", dpo_lora, "--negative-lora", str(tmp_path / "missing.safetensors")]) == 2
    assert "--negative-lora" in capsys.readouterr().err


def test_prompt_alignment_is_clip_text_image_similarity(tmp_path, dpo_lora, tiny_clip, capsys):
    from transformers import CLIPModel, CLIPTokenizer

    report = run_eval(tmp_path, "--lora", dpo_lora, "--prompt-clip", tiny_clip)
    a = report["prompt_alignment"]
    model, tokenizer = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPTokenizer.from_pretrained(tiny_clip)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)

    def similarity(images) -> np.ndarray:  # CLIPScore without the clamp: 100 cos(text, image), written out
        with torch.no_grad():
            pixels = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)
                                  for im in images])
            img = model.get_image_features(pixel_values=(pixels - mean) / std)
            ids = tokenizer(report["prompts"], padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            txt = model.get_text_features(input_ids=ids)
        img = img if isinstance(img, torch.Tensor) else img.pooler_output
        txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
        return (100 * torch.nn.functional.cosine_similarity(img, txt)).numpy()

    base = similarity(sample_images(None, report["prompts"], report["seeds"], steps=STEPS))
    tuned = similarity(sample_images(None, report["prompts"], report["seeds"], steps=STEPS, lora=dpo_lora))
    assert a["base"] == pytest.approx(base.mean(), abs=1e-3) and a["lora"] == pytest.approx(tuned.mean(), abs=1e-3)
    change = tuned - base
    half = 1.96 * change.std(ddof=1) / math.sqrt(SAMPLES)
    assert (a["change"], a["change_low"], a["change_high"]) == pytest.approx(
        (change.mean(), change.mean() - half, change.mean() + half), abs=1e-3)
    assert "prompt alignment (CLIP" in capsys.readouterr().out
