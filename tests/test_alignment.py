"""Every method aligns the toy model: the chosen attribute's rate rises beyond its 95% interval.

The toy world's preference data prefers "shaded" over "flat" for the same object, and the prompts
leave the style open, so a method that learns the preference must raise the shaded rate of samples
drawn with the same prompts and seeds. The check is strict: the Wilson interval of the rate after
training lies entirely above the interval before it (after.low > before.high).

Budget: every method gets the same training (trainer.demo.DEMO_TRAINING: batch 8, lr 1e-3, rank 8,
alpha 8, seed 0) for STEPS steps on PAIRS pairs; the dataset's encodings are cached once and shared.
Non-default method options (TOY_METHOD_ARGS, shared with benchmarks/alignment.py) are documented there.
"""
from __future__ import annotations

import contextlib
import io
import resource
import time

import pytest

from benchmarks.alignment import TOY_METHOD_ARGS, align
from trainer.demo import attribute_report, evaluation_set
from trainer.methods import method_names
from trainer.toy import sample_images, write_preference_dataset

ATTRIBUTE = "shaded"
PAIRS, STEPS, SAMPLES, SAMPLE_STEPS = 64, 40, 96, 10


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    work = tmp_path_factory.mktemp("alignment")
    data = write_preference_dataset(work / "data", ATTRIBUTE, PAIRS, seed=0)
    prompts, seeds = evaluation_set(ATTRIBUTE, SAMPLES, seed=10_000)
    before = attribute_report(sample_images(None, prompts, seeds, steps=SAMPLE_STEPS), ATTRIBUTE)
    return work, data, prompts, seeds, before


def test_every_registered_method_is_checked():
    assert set(TOY_METHOD_ARGS) <= set(method_names())


@pytest.mark.parametrize("method", method_names())
def test_method_raises_the_chosen_attribute_rate_beyond_its_interval(world, method):
    work, data, prompts, seeds, before = world
    wall, cpu = time.perf_counter(), cpu_seconds()
    with contextlib.redirect_stdout(io.StringIO()):
        lora, _ = align(method, data, work, STEPS)
    after = attribute_report(sample_images(None, prompts, seeds, steps=SAMPLE_STEPS, lora=str(lora)), ATTRIBUTE)
    print(f"{method}: {before} -> {after} ({time.perf_counter() - wall:.1f}s wall, {cpu_seconds() - cpu:.1f}s CPU)")
    assert after.low > before.high, f"{method}: {before} -> {after}"
