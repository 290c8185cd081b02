"""Loading the shipped toy model and sampling from it deterministically on CPU (DDIM, eta 0)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from diffusers import StableDiffusionPipeline
from PIL import Image
from torch import Tensor

#: Classifier-free guidance used for every toy evaluation unless told otherwise.
GUIDANCE_SCALE = 3.0


def toy_model_path() -> Path:
    """The shipped toy model (diffusers layout); what `--model toy` resolves to."""
    return Path(__file__).resolve().parent / "model"


def load_toy_pipeline(path: str | os.PathLike | None = None) -> StableDiffusionPipeline:
    """The toy StableDiffusionPipeline in fp32 on CPU, from `path` (default: the shipped model)."""
    pipe = StableDiffusionPipeline.from_pretrained(
        path or toy_model_path(), safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_images(
    pipeline_or_path: StableDiffusionPipeline | str | os.PathLike | None,
    prompts: str | Sequence[str],
    seeds: Sequence[int],
    steps: int = 20,
    lora: str | os.PathLike | dict[str, Tensor] | None = None,
    guidance_scale: float = GUIDANCE_SCALE,
    batch_size: int = 64,
    threads: int | None = 1,
    negative_lora: str | os.PathLike | dict[str, Tensor] | None = None,
    negative_strength: float = 1.0,
) -> list[Image.Image]:
    """One image per seed, `prompts[i]` for `seeds[i]` (a single prompt is used for all seeds).

    Each image's starting noise comes from its own seed, so an image does not depend on the batch
    it is drawn in. `lora` (a LoRA file/folder or state dict that `load_lora_weights` accepts) is
    applied for this call only; `negative_lora` (same forms) only to the unconditional branch of
    classifier-free guidance, at `negative_strength` (Diffusion-NPO, trainer.generate.negative_branch).
    A pipeline passed in is left as it was. `threads` sets torch's CPU
    threads for the call (None: leave as is); the toy model is so small that one thread is fastest,
    and on a busy 2-core machine two threads were 25x slower than one.
    """
    from ..generate import generate

    pipe = pipeline_or_path if isinstance(pipeline_or_path, StableDiffusionPipeline) else load_toy_pipeline(pipeline_or_path)
    return generate(pipe, prompts, seeds, steps, guidance_scale, lora, batch_size, threads,
                    negative_lora=negative_lora, negative_strength=negative_strength)
