"""The toy attribute classifier on ground-truth renders, and the Wilson interval."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.toy.scoring import attribute_rate, classify, has_attribute, rate_interval, wilson_interval
from trainer.toy.world import ATTRIBUTES, BACKGROUND, make_dataset, random_spec, render, to_pil


@pytest.fixture(scope="module")
def ground_truth():
    return make_dataset(600, seed=123)


@pytest.mark.parametrize("kind", list(ATTRIBUTES))
def test_classifier_accuracy_on_renders(ground_truth, kind):
    images, specs = ground_truth
    found = [classify(im)[kind] for im in images]
    accuracy = np.mean([f == s.value(kind) for f, s in zip(found, specs)])
    assert accuracy >= 0.95, f"{kind} accuracy {accuracy:.3f}"


def test_input_formats_agree():
    img = render(random_spec(np.random.default_rng(5), style="shaded", colour="blue", shape="circle"))
    pil = to_pil(img)
    tensor = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255
    expected = {"shape": "circle", "colour": "blue", "style": "shaded"}
    assert classify(pil) == classify(np.asarray(pil)) == classify(tensor) == classify(img) == expected


def test_attribute_rate_counts_the_attribute():
    rng = np.random.default_rng(0)
    images = [to_pil(render(random_spec(rng, style="shaded" if i < 3 else "flat"))) for i in range(10)]
    assert attribute_rate(images, "shaded") == pytest.approx(0.3)
    assert attribute_rate(images, "flat") == pytest.approx(0.7)
    assert rate_interval(images, "shaded")[0] == pytest.approx(0.3)
    with pytest.raises(ValueError):
        attribute_rate(images, "purple")


def test_blank_image_has_no_attribute():
    blank = np.broadcast_to(np.asarray(BACKGROUND, np.float32), (32, 32, 3)).copy()
    assert classify(blank) == {"shape": None, "colour": None, "style": None}
    assert not has_attribute(blank, "flat")


def test_wilson_interval():
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(10, 10)[1] == 1.0
    for bad in [(1, 0), (-1, 5), (6, 5)]:
        with pytest.raises(ValueError):
            wilson_interval(*bad)


# ---------------------------------------------------------------- prompt fidelity


def labelled(shape, colour, style):
    """A render whose attributes are known (the label is the spec itself)."""
    return to_pil(render(random_spec(np.random.default_rng(0), shape=shape, colour=colour, style=style)))


def test_prompt_fidelity_on_hand_labelled_images():
    from trainer.toy.scoring import fidelity_counts, fidelity_drops, fidelity_rates, prompted_attributes

    images = [labelled("circle", "red", "shaded"), labelled("square", "blue", "flat"),
              labelled("triangle", "green", "flat"), labelled("circle", "yellow", "shaded")]
    prompts = ["a red circle", "a red square", "a shaded green triangle", "a yellow shape"]
    assert prompted_attributes("a shaded green triangle") == {"style": "shaded", "colour": "green", "shape": "triangle"}
    assert prompted_attributes("a shape") == {}
    # colour: red ok, blue for red, green ok, yellow ok; shape: circle, square, triangle ok; style: flat for shaded
    assert fidelity_counts(images, prompts) == {"colour": (3, 4), "shape": (3, 3), "style": (0, 1)}
    rates = fidelity_rates(images, prompts)
    assert rates["colour"][0] == 0.75 and rates["colour"][1:] == pytest.approx(wilson_interval(3, 4))
    after = fidelity_rates(images[:1] + [labelled("square", "red", "flat")] + images[2:], prompts)
    assert after["colour"][0] == 1.0 and fidelity_drops(rates, after) == {}
    assert fidelity_drops(after, rates) == {"colour": pytest.approx(0.25)}  # 100% -> 75%: more than 5 points
    assert fidelity_drops({"shape": (0.80,)}, {"shape": (0.76,)}) == {}  # a 4-point fall is within the bound
    with pytest.raises(ValueError):
        fidelity_counts(images, prompts[:2])
