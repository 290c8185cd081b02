"""trainer/generate.py: the sampling pipeline for each family the trainer loads, seeds, and a LoRA for one call."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import tiny_config
from trainer.generate import FAMILIES, family_of, generate, load_pipeline


@pytest.mark.parametrize("kind, family, architecture", [
    ("tiny-sd", "StableDiffusionPipeline", "sd15"), ("tiny-sdxl", "StableDiffusionXLPipeline", "sdxl"),
    ("tiny-sd3", "StableDiffusion3Pipeline", "sd3"), ("tiny-flux", "FluxPipeline", "flux")])
def test_each_family_samples_by_seed(kind, family, architecture):
    pipe = load_pipeline(kind, device="cpu")
    assert type(pipe).__name__ == family and family_of(pipe) is FAMILIES[architecture]
    size = 32 if kind == "tiny-flux" else None  # FluxPipeline's native size is 128 latent pixels (256 px here)
    batch = generate(pipe, ["a red square", "a blue circle"], [1, 2], steps=2, guidance_scale=3.0, size=size)
    alone = generate(pipe, "a blue circle", [2], steps=2, guidance_scale=3.0, size=size)
    assert batch[0].size == (32, 32)
    # an image does not depend on its batch (up to one level of rounding: batched kernels round differently)
    assert np.abs(np.asarray(batch[1], dtype=int) - np.asarray(alone[0], dtype=int)).max() <= 1
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


@pytest.mark.parametrize("kind", ["tiny-sd3", "tiny-flux"])
def test_a_flow_lora_applies_for_one_call_only(tmp_path, kind):
    """The trainer's SD3/Flux LoRA file (diffusers `transformer.` keys) samples through the same pipeline."""
    from trainer.run import run

    lora = run(tiny_config(tmp_path, model=kind, max_steps=2, learning_rate=0.05)).lora_path
    pipe = load_pipeline(kind, device="cpu")
    before = generate(pipe, "a red square", [5], steps=2, guidance_scale=3.0, size=32)[0]
    tuned = generate(pipe, "a red square", [5], steps=2, guidance_scale=3.0, lora=str(lora), size=32)[0]
    after = generate(pipe, "a red square", [5], steps=2, guidance_scale=3.0, size=32)[0]
    assert not np.array_equal(np.asarray(before), np.asarray(tuned))
    assert np.array_equal(np.asarray(before), np.asarray(after))
