"""The shipped toy model: layout, offline loading, deterministic sampling, base attribute rate."""
from __future__ import annotations

import numpy as np
import pytest
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig, get_peft_model_state_dict

from trainer.toy.dataset import open_prompts
from trainer.toy.sampling import load_toy_pipeline, sample_images, toy_model_path
from trainer.toy.scoring import classify

MODEL = toy_model_path()
BASE_RATE_BAND = (0.2, 0.8)  # shaded rate when the caption leaves the style open


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    return load_toy_pipeline()


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def test_layout_and_size():
    for rel in ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
                "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                "vae/diffusion_pytorch_model.safetensors"]:
        assert (MODEL / rel).is_file(), rel
    assert sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file()) < 20e6
    assert not list(MODEL.rglob("*.bin"))


def test_loads_with_the_standard_pipeline():
    pipe = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None)
    assert isinstance(pipe.scheduler, DDPMScheduler)
    assert pipe.scheduler.config.num_train_timesteps == 1000 and pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.tokenizer.tokenize("a shaded red circle") == ["a</w>", "shaded</w>", "red</w>", "circle</w>"]
    assert pipe.text_encoder.config.max_position_embeddings >= pipe.tokenizer.model_max_length


def test_sampling_is_deterministic_and_independent_of_the_batch(pipe):
    prompts, seeds = ["a red circle", "a blue square", "a yellow triangle"], [5, 6, 7]
    first = sample_images(pipe, prompts, seeds, steps=8)
    assert [im.size for im in first] == [(32, 32)] * 3
    assert np.array_equal(pixels(first), pixels(sample_images(MODEL, prompts, seeds, steps=8)))
    alone = sample_images(pipe, prompts[1:2], seeds[1:2], steps=8)
    assert np.abs(pixels(alone)[0] - pixels(first)[1]).max() <= 2
    with pytest.raises(ValueError):
        sample_images(pipe, prompts, seeds[:2])


def test_base_rate_of_the_open_attribute_and_caption_fidelity(pipe):
    prompts = open_prompts("shaded") * 8  # 96 samples, style left open
    found = [classify(im) for im in sample_images(pipe, prompts, range(len(prompts)))]
    rate = sum(f["style"] == "shaded" for f in found) / len(found)
    assert BASE_RATE_BAND[0] <= rate <= BASE_RATE_BAND[1], rate
    colour_ok = np.mean([f["colour"] is not None and f["colour"] in p.split() for f, p in zip(found, prompts)])
    shape_ok = np.mean([f["shape"] is not None and f["shape"] in p.split() for f, p in zip(found, prompts)])
    assert colour_ok >= 0.9 and shape_ok >= 0.9, (colour_ok, shape_ok)  # shipped model: 1.00, 0.94


def test_the_prompted_colour_is_kept_in_either_style(pipe):
    """Fidelity must not depend on the style the sample lands in, or moving the style alone (the demo's preference)
    would change prompt fidelity. The 1500-step model kept the colour in 70% of shaded samples and 90% of flat ones."""
    prompts = open_prompts("shaded") * 8
    found = [classify(im) for im in sample_images(pipe, prompts, range(100, 100 + len(prompts)))]
    for style in ("shaded", "flat"):
        kept = [f["colour"] in p.split() for f, p in zip(found, prompts) if f["style"] == style]
        assert len(kept) >= 20 and np.mean(kept) >= 0.9, (style, np.mean(kept), len(kept))


def test_lora_applies_for_one_call_only(pipe, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(MODEL / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(unet))
    before = pixels(sample_images(pipe, "a red circle", [0, 1], steps=4))
    with_lora = pixels(sample_images(pipe, "a red circle", [0, 1], steps=4,
                                     lora=tmp_path / "pytorch_lora_weights.safetensors"))
    assert np.abs(with_lora - before).max() > 10
    assert np.array_equal(before, pixels(sample_images(pipe, "a red circle", [0, 1], steps=4)))
