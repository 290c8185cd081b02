"""The toy world: deterministic, controllable, captioned and tokenized word by word."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from trainer.toy.tokenizer import write_tokenizer
from trainer.toy.world import (
    ATTRIBUTES, BACKGROUND, RGB, attribute_kind, caption, caption_words, make_dataset, random_spec, render, training_caption,
)


def test_dataset_is_deterministic_per_seed():
    a, specs_a = make_dataset(16, seed=3)
    b, specs_b = make_dataset(16, seed=3)
    c, _ = make_dataset(16, seed=4)
    assert a.shape == (16, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and specs_a == specs_b
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("kind", list(ATTRIBUTES))
def test_pinned_attributes_are_respected(kind):
    rng = np.random.default_rng(0)
    for value in ATTRIBUTES[kind]:
        specs = [random_spec(rng, **{kind: value}) for _ in range(10)]
        assert all(s.value(kind) == value for s in specs)
    with pytest.raises(ValueError):
        random_spec(rng, **{kind: "purple"})


def test_style_changes_only_the_shading():
    spec = random_spec(np.random.default_rng(1), style="flat", colour="red", shape="square")
    flat = render(spec)
    shaded = render(dataclasses.replace(spec, style="shaded"))
    background = np.isclose(flat, BACKGROUND, atol=1e-6).all(-1)
    assert np.array_equal(background, np.isclose(shaded, BACKGROUND, atol=1e-6).all(-1))  # same silhouette
    assert np.isclose(flat, RGB["red"], atol=1e-6).all(-1).sum() >= 100  # flat: one colour inside
    ys, xs = np.nonzero(~background)
    brightness = shaded.mean(-1)
    assert brightness[ys.min() + 1, xs.min() + 1] > 2 * brightness[ys.max() - 1, xs.max() - 1]  # lit from top left


def test_captions_name_exactly_the_given_attributes():
    assert caption("circle", "red") == "a red circle"
    assert caption("triangle", "blue", "shaded") == "a shaded blue triangle"
    assert caption(colour="green") == "a green shape"
    assert caption() == "a shape"
    assert attribute_kind("shaded") == "style" and attribute_kind("yellow") == "colour"
    rng = np.random.default_rng(0)
    spec = random_spec(rng)
    captions = {training_caption(spec, rng) for _ in range(400)}
    assert "" in captions and caption(spec.shape, spec.colour) in captions
    assert caption(spec.shape, spec.colour, spec.style) in captions


def test_tokenizer_keeps_caption_words_whole(tmp_path):
    tok = write_tokenizer(tmp_path, caption_words())
    assert (tmp_path / "vocab.json").exists() and (tmp_path / "merges.txt").exists()
    for word in caption_words():
        assert tok.tokenize(word) == [word + "</w>"]
    ids = tok("a shaded red circle", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(ids) == tok.model_max_length == 16
    assert tok.decode(ids, skip_special_tokens=True) == "a shaded red circle"
    assert len(tok.tokenize("a purple blob")) > 3  # unknown words fall back to characters
