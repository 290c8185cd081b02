"""trainer/generate.py: the sampling pipeline for each family the trainer loads, seeds, and a LoRA for one call."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import tiny_config
from trainer.generate import FAMILIES, family_of, generate, load_pipeline


@pytest.mark.parametrize("kind, family", [("tiny-sd", "StableDiffusionPipeline"), ("tiny-sdxl", "StableDiffusionXLPipeline")])
def test_each_family_samples_by_seed(kind, family):
    pipe = load_pipeline(kind, device="cpu")
    assert type(pipe).__name__ == family and family_of(pipe) is FAMILIES["sd15" if kind == "tiny-sd" else "sdxl"]
    batch = generate(pipe, ["a red square", "a blue circle"], [1, 2], steps=2, guidance_scale=3.0)
    alone = generate(pipe, "a blue circle", [2], steps=2, guidance_scale=3.0)
    assert batch[0].size == (32, 32)
    assert np.array_equal(np.asarray(batch[1]), np.asarray(alone[0]))  # an image does not depend on its batch
    assert not np.array_equal(np.asarray(batch[0]), np.asarray(batch[1]))
    bigger = generate(pipe, "a blue circle", [2], steps=2, guidance_scale=3.0, size=48)
    assert bigger[0].size == (48, 48)


def test_a_lora_applies_for_one_call_only(tmp_path):
    from trainer.run import run

    lora = run(tiny_config(tmp_path, max_steps=2, learning_rate=0.05)).lora_path
    pipe = load_pipeline("tiny-sd", device="cpu")
    scheduler = pipe.scheduler
    before = generate(pipe, "a red square", [5], steps=2, guidance_scale=3.0)[0]
    tuned = generate(pipe, "a red square", [5], steps=2, guidance_scale=3.0, lora=str(lora))[0]
    after = generate(pipe, "a red square", [5], steps=2, guidance_scale=3.0)[0]
    assert not np.array_equal(np.asarray(before), np.asarray(tuned))
    assert np.array_equal(np.asarray(before), np.asarray(after)) and pipe.scheduler is scheduler
