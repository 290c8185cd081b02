"""Scorers (trainer/scorers): CLIP preference and zero-shot style, the aesthetic head, the toy classifier,
the ensemble's ranks and votes, fingerprints, and the pairing policies built on judgements."""
from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from trainer.pairs import select_pairs, suggest_marks
from trainer.scorers import (AestheticScorer, AttributeScorer, ClipScorer, Ensemble, Judgement, Scorer, StyleJudge,
                             make_scorer, make_scorers, pixels)
from trainer.scorers.ensemble import normalised_ranks, prefers
from trainer.toy import has_attribute, sample_images

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture(scope="module")
def toy_images():
    prompts = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
    return prompts, sample_images(None, prompts, [1, 2, 3, 4], steps=4)


def clip_forward(location, images, texts):
    """transformers' own CLIPModel.forward on the images: (logits_per_image, unit image embeddings)."""
    from transformers import AutoTokenizer, CLIPModel

    model, tok = CLIPModel.from_pretrained(location).eval(), AutoTokenizer.from_pretrained(location)
    ids = tok(texts, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    x = ((pixels(images) + 1) / 2 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():  # 32-pixel images already match the tiny vision tower's size
        out = model(input_ids=ids.input_ids, attention_mask=ids.attention_mask, pixel_values=x)
    return out.logits_per_image, out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)


def test_clip_scorer_is_logit_scale_times_cosine(tiny_clip, toy_images):
    prompts, images = toy_images
    scorer = ClipScorer(tiny_clip)
    scores = scorer.score(images, prompts)
    expected = clip_forward(tiny_clip, images, prompts)[0].diagonal()
    assert scores == pytest.approx(expected.tolist(), abs=1e-4)
    assert len(set(round(s, 5) for s in scores)) > 1
    assert scorer.name == f"clip:{tiny_clip}" and not scorer.binary


def test_style_judge_zero_shot(tiny_clip, toy_images, monkeypatch):
    prompts, images = toy_images
    judge = StyleJudge("shaded", tiny_clip, ["flat"])
    encoded = []
    texts = judge.clip.texts
    monkeypatch.setattr(judge.clip, "texts", lambda labels: encoded.append(labels) or texts(labels))
    flags = judge.score(images, prompts)
    expected = clip_forward(tiny_clip, images, ["a shaded image", "a flat image"])[0].argmax(-1) == 0
    assert flags == [float(x) for x in expected.tolist()]
    assert judge.score(images[::-1], prompts) == flags[::-1]
    assert encoded == [["a shaded image", "a flat image"]]  # the fixed labels are encoded once, not per call
    with pytest.raises(ValueError, match="alternative"):
        StyleJudge("shaded", tiny_clip, ["shaded"])


def test_attribute_scorer_is_the_toy_classifier(toy_images):
    prompts, images = toy_images
    for value in ("shaded", "red"):
        scorer = AttributeScorer(value)
        assert scorer.score(images, prompts) == [float(has_attribute(im, value)) for im in images]
        assert scorer.binary and scorer.name == f"attribute:{value}"
    assert AttributeScorer("red").fingerprint != AttributeScorer("shaded").fingerprint
    with pytest.raises(ValueError, match="purple"):
        AttributeScorer("purple")


def test_fingerprint_follows_the_weights_not_the_folder(tiny_clip, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_clip, copy)
    assert ClipScorer(str(copy)).fingerprint == ClipScorer(tiny_clip).fingerprint
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(copy)
    with torch.no_grad():
        model.visual_projection.weight[0, 0] += 1.0
    model.save_pretrained(copy)
    assert ClipScorer(str(copy)).fingerprint != ClipScorer(tiny_clip).fingerprint


def laion_head(path, width: int, seed: int = 0):
    """A head shaped like LAION's improved predictor (Linear at Sequential indices 0, 2, 4, 6, 7)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [width, 24, 12, 8, 4, 1]
    tensors = {}
    for index, (i, o) in zip((0, 2, 4, 6, 7), zip(sizes, sizes[1:])):
        tensors[f"layers.{index}.weight"] = torch.randn(o, i, generator=g)
        tensors[f"layers.{index}.bias"] = torch.randn(o, generator=g)
    save_file(tensors, str(path))
    return {k: v.numpy().astype(np.float64) for k, v in tensors.items()}


def test_aesthetic_head_matches_numpy(tiny_clip, toy_images, tmp_path):
    prompts, images = toy_images
    weights = laion_head(tmp_path / "head.safetensors", width=16)
    scorer = AestheticScorer(tmp_path / "head.safetensors", tiny_clip)
    embeds = clip_forward(tiny_clip, images, prompts)[1].numpy().astype(np.float64)
    x = embeds
    for index in (0, 2, 4, 6, 7):  # no activation between layers, as in LAION's simple_inference.py
        x = x @ weights[f"layers.{index}.weight"].T + weights[f"layers.{index}.bias"]
    assert scorer.score(images, prompts) == pytest.approx(x[:, 0].tolist(), rel=1e-4, abs=1e-4)

    w = np.random.default_rng(1).normal(size=(1, 16))
    save_file({"weight": torch.tensor(w, dtype=torch.float32), "bias": torch.tensor([0.5])}, str(tmp_path / "linear.safetensors"))
    linear = AestheticScorer(tmp_path / "linear.safetensors", tiny_clip)
    assert linear.score(images, prompts) == pytest.approx((embeds @ w.T + 0.5)[:, 0].tolist(), rel=1e-4, abs=1e-4)
    assert linear.fingerprint != scorer.fingerprint


def test_aesthetic_head_refuses_pickles_and_misfits(tiny_clip, tmp_path):
    torch.save({"weight": torch.zeros(1, 16), "bias": torch.zeros(1)}, tmp_path / "head.pth")
    with pytest.raises(ValueError, match="only .safetensors"):
        AestheticScorer(tmp_path / "head.pth", tiny_clip)
    laion_head(tmp_path / "wide.safetensors", width=768)
    with pytest.raises(ValueError, match="768-wide"):
        AestheticScorer(tmp_path / "wide.safetensors", tiny_clip)
    save_file({"layers.0.weight": torch.zeros(8, 16), "layers.0.bias": torch.zeros(8),
               "layers.2.weight": torch.zeros(1, 9), "layers.2.bias": torch.zeros(1)}, str(tmp_path / "gap.safetensors"))
    with pytest.raises(ValueError, match="do not chain"):
        AestheticScorer(tmp_path / "gap.safetensors", tiny_clip)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        AestheticScorer(tmp_path / "junk.safetensors", tiny_clip)


class Fixed(Scorer):
    """A judge with given scores (one per image, in order)."""

    def __init__(self, name: str, scores: list[float]) -> None:
        self.name, self.fingerprint, self.scores = name, name, scores

    def score(self, images, prompts):
        return list(self.scores[:len(images)])


def ranks_by_hand(s):
    n = len(s)
    return [(sum(b < a for b in s) + 0.5 * (sum(b == a for b in s) - 1)) / (n - 1) for a in s]


def test_normalised_ranks_and_votes():
    s = [0.3, 2.0, 0.3, -1.0, 5.0]
    assert normalised_ranks(s) == pytest.approx(ranks_by_hand(s))
    assert normalised_ranks([7.0]) == [0.5]
    assert prefers("mean-rank", [2, 3, 4], [1, 2, 3]) and not prefers("mean-rank", [2, 3, 4], [1, 2, 5])
    assert prefers("majority", [2, 3, 4], [1, 2, 5]) and not prefers("majority", [2, 3, 4], [1, 3, 5])


def test_ensemble_drops_pairs_the_scorers_disagree_on():
    a = Fixed("a", [4.0, 3.0, 2.0, 1.0])
    b = Fixed("b", [40.0, 10.0, 20.0, 30.0])  # agrees with a on image 0 only
    c = Fixed("c", [1.0, 3.0, 2.0, 0.0])
    images, prompts = [None] * 4, ["p"] * 4
    unanimous = Ensemble([a, b], "mean-rank").judge(images, prompts)
    expected = np.mean([ranks_by_hand(a.scores), ranks_by_hand(b.scores)], axis=0)
    assert unanimous.combined == pytest.approx(expected.tolist())
    kept = set(select_pairs(unanimous, "all-pairs"))
    both = {(i, j) for i in range(4) for j in range(4) if a.scores[i] > a.scores[j] and b.scores[i] > b.scores[j]}
    assert kept == both == {(0, 1), (0, 2), (0, 3)}
    assert set(select_pairs(unanimous, "all-pairs", margin=0.6)) == {(i, j) for i, j in both
                                                                    if expected[i] - expected[j] >= 0.6}
    majority = Ensemble([a, b, c], "majority").judge(images, prompts)
    votes = {(i, j) for i in range(4) for j in range(4)
             if sum(s.scores[i] > s.scores[j] for s in (a, b, c)) >= 2}
    assert set(select_pairs(majority, "all-pairs")) == votes
    copeland = [sum((i, j) in votes for j in range(4)) / 3 for i in range(4)]
    assert majority.combined == pytest.approx(copeland)


def test_ensemble_ranks_within_each_prompt():
    a, b = Fixed("a", [1.0, 2.0, 9.0, 8.0]), Fixed("b", [1.0, 2.0, 3.0, 4.0])
    j = Ensemble([a, b]).judge([None] * 4, ["p", "p", "q", "q"])
    assert j.combined == pytest.approx([0.0, 1.0, 0.5, 0.5])


def test_pairing_policies_and_marks():
    j = Judgement([0.2, 0.9, 0.2, 0.5], [[0.2, 0.9, 0.2, 0.5]], ["s"])
    assert select_pairs(j, "best-worst") == [(1, 0)]  # ties for worst: the first is taken
    assert select_pairs(j, "best-worst", margin=0.8) == []
    assert sorted(select_pairs(j, "all-pairs", margin=0.3)) == [(1, 0), (1, 2), (1, 3), (3, 0), (3, 2)]
    assert sorted(select_pairs(j, "all-pairs", margin=0.5)) == [(1, 0), (1, 2)]
    assert select_pairs(Judgement([1.0, 1.0], [[1.0, 1.0]], ["s"]), "best-worst") == []  # no preference, no pair
    assert j.keeps(1, 3, 0.3) and not j.keeps(1, 3, 0.5) and not j.keeps(0, 2) and not j.keeps(3, 1)
    split = Judgement([1.0, 0.0], [[2.0, 1.0], [0.0, 3.0]], ["a", "b"], "mean-rank")  # members disagree
    assert not split.keeps(0, 1) and not split.keeps(1, 0)
    assert suggest_marks(j) == ["rejected", "chosen", "none", "none"]
    assert suggest_marks(j, per_side=2) == ["rejected", "chosen", "rejected", "chosen"]
    assert suggest_marks(j, margin=0.5) == ["rejected", "chosen", "none", "none"]
    assert suggest_marks(j, margin=0.8) == ["none"] * 4


def test_make_scorer_specs(tiny_clip, tmp_path):
    (tmp_path / "not-clip").mkdir()
    with pytest.raises(ValueError, match=re.escape(f"--scorer clip:{tmp_path / 'not-clip'}: cannot load a CLIP model")):
        make_scorer(f"clip:{tmp_path / 'not-clip'}")
    with pytest.raises(ValueError, match="--scorer-model: someone/clip"):
        make_scorer("clip", clip_model="someone/clip")  # offline (the suite runs with HF_HUB_OFFLINE=1)
    assert make_scorer("attribute:red").name == "attribute:red"
    both = make_scorer(["attribute:red", f"clip:{tiny_clip}"], "majority")
    assert isinstance(both, Ensemble) and both.vote == "majority"
    assert [i["name"] for i in both.identities()] == [both.name, "attribute:red", f"clip:{tiny_clip}"]
    assert make_scorer("clip", clip_model=tiny_clip).name == f"clip:{tiny_clip}"
    assert make_scorer("style:shaded").name == "attribute:shaded"  # no CLIP: the toy classifier judges
    clips = {}  # two calls sharing their CLIPs (iterate's judge and its evaluation scorers) load one once
    (first,) = make_scorers([f"clip:{tiny_clip}"], clips=clips)
    (second,) = make_scorers(["style:shaded"], clip_model=tiny_clip, clips=clips)
    assert second.clip is first.clip and clips == {tiny_clip: first.clip}
    assert make_scorers([f"clip:{tiny_clip}"])[0].clip is not first.clip  # unshared: a call of its own
    for spec, message in [("pickscore", "unknown kind"), ("clip", "needs a CLIP model"),
                          ("aesthetic", "aesthetic:HEAD.safetensors,CLIP_MODEL"), ("attribute", "name the attribute"),
                          (f"clip:{tmp_path / 'nothing'}", "no such file or folder")]:
        with pytest.raises(ValueError, match=message):
            make_scorer(spec)
