"""Every method aligns the toy model without collateral damage: the chosen attribute's rate rises beyond
its 95% interval, and every attribute the prompts name keeps its rate within 5 points.

The toy world's preference data prefers "shaded" over "flat" for the same object, and the prompts leave
the style open but name colour and shape. A method that learns the preference must raise the shaded rate
of samples drawn with the same prompts and seeds (strictly: the Wilson interval after training lies
above the interval before it); one that does so without collateral damage keeps drawing the prompted
colour and shape (npo: its LoRA in the negative branch of guidance only).

Budget: the toy recipe of benchmarks/alignment.py (trainer.demo.toy_training: batch 8, lr 1e-3, rank 8,
alpha 8, seed 0; 40 steps; cal-dpo beta 200; npo lr 1e-4 and 120 steps, reasons there) on PAIRS pairs;
the dataset's encodings are cached once and shared. SAMPLES = 192 keeps each interval about +-7 points
wide; every method's rate clears the base's interval by 40 points or more, and fidelity moves by at most
2 points on the shipped model, so small numeric differences between CPUs cannot flip a verdict.
"""
from __future__ import annotations

import contextlib
import io
import resource
import time

import pytest

from benchmarks.alignment import TOY_METHOD_ARGS, TOY_STEPS, align
from trainer.demo import attribute_report, evaluation_set, fidelity_falls, fidelity_report, sample_with_lora
from trainer.methods import method_names
from trainer.toy import sample_images, write_preference_dataset

ATTRIBUTE = "shaded"
PAIRS, SAMPLES, SAMPLE_STEPS = 64, 192, 10


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    work = tmp_path_factory.mktemp("alignment")
    data = write_preference_dataset(work / "data", ATTRIBUTE, PAIRS, seed=0)
    prompts, seeds = evaluation_set(ATTRIBUTE, SAMPLES, seed=10_000)
    base = sample_images(None, prompts, seeds, steps=SAMPLE_STEPS)
    return work, data, prompts, seeds, attribute_report(base, ATTRIBUTE), fidelity_report(base, prompts)


def test_toy_settings_name_registered_methods():
    assert set(TOY_METHOD_ARGS) | set(TOY_STEPS) <= set(method_names())


@pytest.mark.parametrize("method", method_names())
def test_method_moves_the_chosen_attribute_and_keeps_the_prompted_ones(world, method):
    work, data, prompts, seeds, before, fidelity_before = world
    wall, cpu = time.perf_counter(), cpu_seconds()
    with contextlib.redirect_stdout(io.StringIO()):
        lora, _, _ = align(method, data, work)
    images = sample_with_lora(method, lora, prompts, seeds, steps=SAMPLE_STEPS)
    after, fidelity_after = attribute_report(images, ATTRIBUTE), fidelity_report(images, prompts)
    print(f"{method}: {before} -> {after}; " + ", ".join(f"{k} {fidelity_before[k]} -> {fidelity_after[k]}"
                                                       for k in fidelity_before)
          + f" ({time.perf_counter() - wall:.1f}s wall, {cpu_seconds() - cpu:.1f}s CPU)")
    assert set(fidelity_before) == {"colour", "shape"}
    assert after.low > before.high, f"{method}: {before} -> {after}"
    assert not fidelity_falls(fidelity_before, fidelity_after), (method, fidelity_before, fidelity_after)
