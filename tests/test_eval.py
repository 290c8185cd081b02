"""`python -m trainer eval`: win-rate arithmetic, the attribute, CLIP and style scorers, the CLI end to end."""
from __future__ import annotations

import json

import pytest
import torch

from trainer.cli import main
from trainer.evaluate import AttributeScorer, ClipScorer, StyleScorer, pixels, rate, win_rate
from trainer.toy import has_attribute, sample_images, write_preference_dataset


def test_win_rate_counts_strict_wins_with_a_wilson_interval():
    w = win_rate([3.0, 1.0, 2.0, 2.5], [1.0, 2.0, 2.0, 0.0])
    assert (w.wins, w.ties, w.losses, w.n) == (2, 1, 1, 4)
    assert w.rate == 0.5
    # Wilson 95% interval for 2/4, from the closed form: (0.1500, 0.8500)
    assert w.low == pytest.approx(0.15003, abs=1e-4) and w.high == pytest.approx(0.84997, abs=1e-4)
    w = win_rate([1.0] * 10, [0.0] * 10)
    assert w.rate == 1.0 and w.low == pytest.approx(0.72247, abs=1e-4) and w.high == 1.0  # Wilson 10/10
    r = rate([1, 0, 0, 0, 1, 0, 0, 0, 0, 0])
    assert (r.hits, r.n, r.rate) == (2, 10, 0.2)
    assert r.low == pytest.approx(0.05668, abs=1e-4) and r.high == pytest.approx(0.50983, abs=1e-4)  # Wilson 2/10
    with pytest.raises(ValueError):
        win_rate([1.0], [1.0, 2.0])


def build_tiny_clip(folder):
    """A random CLIP (32-wide towers, 32-pixel images) with the char-level tokenizer, saved like a hub model."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from trainer.models.tiny import write_char_tokenizer

    vocab = write_char_tokenizer(folder / "tok")
    tok = CLIPTokenizer(str(folder / "tok" / "vocab.json"), str(folder / "tok" / "merges.txt"), model_max_length=32)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=32, bos_token_id=vocab - 2,
                         eos_token_id=vocab - 1, pad_token_id=vocab - 1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).eval().save_pretrained(folder / "clip")
    tok.save_pretrained(folder / "clip")
    return folder / "clip"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return str(build_tiny_clip(tmp_path_factory.mktemp("clip")))


@pytest.fixture(scope="module")
def toy_images():
    prompts = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
    return prompts, sample_images(None, prompts, [1, 2, 3, 4], steps=4)


def clip_logits(location, images, texts):
    """logits_per_image of CLIPModel.forward: logit_scale * cos(image, text), computed by transformers."""
    from transformers import AutoTokenizer, CLIPModel

    model, tok = CLIPModel.from_pretrained(location).eval(), AutoTokenizer.from_pretrained(location)
    ids = tok(texts, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    x = ((pixels(images) + 1) / 2 - mean) / std  # 32-pixel images already match the vision tower's size
    with torch.no_grad():
        return model(input_ids=ids.input_ids, attention_mask=ids.attention_mask, pixel_values=x).logits_per_image


def test_clip_scorer_is_logit_scale_times_cosine(tiny_clip, toy_images):
    prompts, images = toy_images
    scores = ClipScorer(tiny_clip).score(images, prompts)
    expected = clip_logits(tiny_clip, images, prompts).diagonal()
    assert scores == pytest.approx(expected.tolist(), abs=1e-4)
    assert len(set(round(s, 5) for s in scores)) > 1


def test_style_scorer_zero_shot_and_toy_classifier(tiny_clip, toy_images):
    prompts, images = toy_images
    flags = StyleScorer("shaded", ClipScorer(tiny_clip)).score(images, prompts)
    expected = clip_logits(tiny_clip, images, ["a shaded image", "a flat image"]).argmax(-1) == 0
    assert flags == [float(x) for x in expected.tolist()]
    assert StyleScorer("shaded").score(images, prompts) == [float(has_attribute(im, "shaded")) for im in images]
    assert AttributeScorer("red").score(images, prompts) == [float(has_attribute(im, "red")) for im in images]


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


def test_eval_cli_attribute_scorer_matches_independent_sampling(tmp_path, toy_lora, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--lora", toy_lora, "--samples", "6", "--steps", "4", "--seed", "50",
                 "--output-dir", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert (out / "grid.png").stat().st_size > 0
    assert "win rate" in capsys.readouterr().out
    assert report["seeds"] == list(range(50, 56)) and report["samples"] == 6
    base = sample_images(None, report["prompts"], report["seeds"], steps=4)
    tuned = sample_images(None, report["prompts"], report["seeds"], steps=4, lora=toy_lora)
    b = [has_attribute(im, "shaded") for im in base]
    a = [has_attribute(im, "shaded") for im in tuned]
    assert report["scores"] == {"base": [float(x) for x in b], "lora": [float(x) for x in a]}
    assert report["win_rate"]["wins"] == sum(x and not y for x, y in zip(a, b))
    assert report["before"]["hits"] == sum(b) and report["after"]["hits"] == sum(a)


def test_eval_cli_clip_and_style_scorers(tmp_path, toy_lora, tiny_clip):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    for scorer in ("clip", "style"):
        out = tmp_path / scorer
        assert main(["eval", "--lora", toy_lora, "--scorer", scorer, "--scorer-model", tiny_clip, "--prompts",
                     str(prompts), "--samples", "3", "--steps", "3", "--output-dir", str(out)]) == 0
        report = json.loads((out / "eval.json").read_text())
        assert report["prompts"] == ["a red circle", "a blue square", "a red circle"]
        w = report["win_rate"]
        lora, base = report["scores"]["lora"], report["scores"]["base"]
        assert w["wins"] == sum(x > y for x, y in zip(lora, base))
        assert w["wins"] + w["ties"] + w["losses"] == 3
        assert ("mean_lora" in report) == (scorer == "clip") and ("after" in report) == (scorer == "style")


def test_eval_cli_errors(tmp_path, toy_lora):
    assert main(["eval", "--lora", str(tmp_path / "missing.safetensors")]) == 2
    assert main(["eval", "--lora", toy_lora, "--scorer", "clip"]) == 2
    assert main(["eval", "--lora", toy_lora, "--attribute", "purple"]) == 2
    assert main(["eval", "--lora", toy_lora, "--prompts", str(tmp_path / "missing.txt")]) == 2
