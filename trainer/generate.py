"""Sampling from any model the trainer loads: the family's diffusers pipeline, recorded seeds, optional LoRA.

`pipeline_from_components` turns the trainer's `Components` into the pipeline of their family; adding a
family is one entry in `FAMILIES` (its pipeline class, how the components fill its constructor, and the
scheduler used for sampling). `generate` draws one image per seed: each image's starting noise comes from
its own seed, so an image does not depend on the batch it was drawn in, and a (prompt, seed) pair always
gives the same image (DDIM with eta 0 is deterministic for SD-family models).

A negative LoRA (`negative_branch`) acts on the unconditional branch of classifier-free guidance only, as
Diffusion-NPO samples (Wang et al., ICLR 2025; G-U-N/Diffusion-NPO `pipeline_stable_diffusion_double_unet.py`:
the unconditional prediction comes from `negative_unet`, the model with the NPO LoRA, the conditional one
from the model):

    eps = eps_{model+npo}(x_t, c_neg) + w * (eps_model(x_t, c) - eps_{model+npo}(x_t, c_neg))
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from PIL import Image
from torch import Tensor

from .models.loading import Components

LoraSource = str | os.PathLike | dict[str, Tensor]
LORA_ADAPTER = "prefalign_sample_lora"
NEGATIVE_ADAPTER = "prefalign_negative_lora"
GUIDANCE_SCALE = 7.5  # classifier-free guidance for real models (the toy model's is `toy.GUIDANCE_SCALE`)


def default_guidance(model: str) -> float:
    from .toy import GUIDANCE_SCALE as TOY_GUIDANCE

    return TOY_GUIDANCE if model == "toy" else GUIDANCE_SCALE


def cpu_threads(model: str) -> int | None:
    """Torch threads for sampling: one for the toy model (it is so small that on a busy 2-core machine two
    threads were 25x slower than one), torch's own choice for anything else."""
    return 1 if model == "toy" else None


def _ddim(config: dict) -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(config)


def _sd15_arguments(parts: Components) -> dict:
    return dict(vae=parts.vae, text_encoder=parts.text_encoders[0], tokenizer=parts.tokenizers[0], unet=parts.denoiser,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _sdxl_arguments(parts: Components) -> dict:
    return dict(vae=parts.vae, text_encoder=parts.text_encoders[0], text_encoder_2=parts.text_encoders[1],
                tokenizer=parts.tokenizers[0], tokenizer_2=parts.tokenizers[1], unet=parts.denoiser, add_watermarker=False)


def _sd3_arguments(parts: Components) -> dict:
    encoders = [*parts.text_encoders, None][:3]  # T5 may be dropped (`drop_t5`): the pipeline takes None
    return dict(transformer=parts.denoiser, vae=parts.vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                text_encoder_3=encoders[2], tokenizer=parts.tokenizers[0], tokenizer_2=parts.tokenizers[1],
                tokenizer_3=parts.tokenizers[2] if encoders[2] is not None else None)


def _flux_arguments(parts: Components) -> dict:
    return dict(transformer=parts.denoiser, vae=parts.vae, text_encoder=parts.text_encoders[0],
                text_encoder_2=parts.text_encoders[1], tokenizer=parts.tokenizers[0], tokenizer_2=parts.tokenizers[1])


def _flow_euler(config: dict) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(config)  # deterministic: the seed fixes the image


@dataclass(frozen=True)
class Family:
    pipeline: str  # diffusers pipeline class name
    arguments: Callable[[Components], dict]  # constructor arguments (all but the scheduler) from the components
    sampler: Callable[[dict], Any]  # the sampling scheduler, from the model's scheduler config
    call_options: dict = field(default_factory=dict)  # extra arguments of the pipeline call


#: Architecture (`Components.architecture`) -> how to sample it.
FAMILIES: dict[str, Family] = {
    "sd15": Family("StableDiffusionPipeline", _sd15_arguments, _ddim, {"eta": 0.0}),
    "sdxl": Family("StableDiffusionXLPipeline", _sdxl_arguments, _ddim, {"eta": 0.0}),
    "sd3": Family("StableDiffusion3Pipeline", _sd3_arguments, _flow_euler),
    "flux": Family("FluxPipeline", _flux_arguments, _flow_euler),
}


def family_of(pipe: Any) -> Family:
    for family in FAMILIES.values():
        if type(pipe).__name__ == family.pipeline:
            return family
    raise ValueError(f"no sampling recipe for a {type(pipe).__name__}; known: {', '.join(FAMILIES)}")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def pipeline_from_components(parts: Components, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """The diffusers pipeline of the components' family, with its sampling scheduler, on `device`."""
    import diffusers

    if parts.architecture not in FAMILIES:
        raise ValueError(f"cannot sample a {parts.architecture} model yet; known: {', '.join(FAMILIES)}")
    family = FAMILIES[parts.architecture]
    pipe = getattr(diffusers, family.pipeline)(**family.arguments(parts), scheduler=family.sampler(parts.scheduler.config))
    device = torch.device(device)
    pipe.to(device, dtype or default_dtype(device))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(model: str, vae: str | None = None, model_config: str | None = None,
                  device: torch.device | str | None = None, dtype: torch.dtype | None = None):
    """Any model `train --model` takes (folder, hub id, single file, toy, tiny-*) as a sampling pipeline."""
    from .models.factory import load_model_components
    from .models.loading import check_model_source

    for option, location in (("--model", model), ("--vae", vae), ("--model-config", model_config)):
        if location is not None:
            check_model_source(location, option)  # a typo or an offline hub id: said before anything loads
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return pipeline_from_components(load_model_components(model, vae, model_config), device, dtype)


@contextmanager
def sampling(pipe, lora: LoraSource | None = None, threads: int | None = None,
             negative_lora: LoraSource | None = None, negative_strength: float = 1.0) -> Iterator[Any]:
    """The pipeline with its family's sampler, `lora` applied and `negative_lora` on the unconditional branch
    (strength 0: not at all), restored afterwards (threads too)."""
    original, previous_threads = pipe.scheduler, torch.get_num_threads()
    pipe.scheduler = family_of(pipe).sampler(original.config)
    if lora is not None:
        pipe.load_lora_weights(lora, adapter_name=LORA_ADAPTER)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        if negative_lora is None or negative_strength == 0.0:
            yield pipe
        else:
            with negative_branch(pipe, negative_lora, negative_strength, [LORA_ADAPTER] if lora is not None else []):
                yield pipe
    finally:
        torch.set_num_threads(previous_threads)
        if lora is not None:
            pipe.delete_adapters(LORA_ADAPTER)
        pipe.scheduler = original


def take_rows(value: Any, rows: slice | Tensor, n: int) -> Any:
    """`value` with the batch rows `rows` kept wherever it carries the n-row batch (tensors, dicts, lists)."""
    if isinstance(value, Tensor):
        return value[rows] if value.ndim and value.shape[0] == n else value
    if isinstance(value, dict):
        return {k: take_rows(v, rows, n) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(take_rows(v, rows, n) for v in value)
    return value


def _cat(parts: list[Any]) -> Any:
    """The denoiser outputs of the two halves, joined along the batch (a tuple, or a diffusers output)."""
    if isinstance(parts[0], Tensor):
        return torch.cat(parts)
    if isinstance(parts[0], tuple):
        return tuple(_cat([p[i] for p in parts]) for i in range(len(parts[0])))
    return type(parts[0])(**{k: _cat([p[k] for p in parts]) for k in parts[0].keys()})


@contextmanager
def negative_branch(pipe, lora: LoraSource, strength: float, positive: Sequence[str] = ()) -> Iterator[None]:
    """Sample with `lora` at `strength` in the unconditional branch of classifier-free guidance only.

    The diffusers SD, SDXL and SD3 pipelines run the negative and the positive conditioning as one batch,
    negative half first (`torch.cat([negative_prompt_embeds, prompt_embeds])`); while this is active the
    denoiser runs that batch as two, the first half with the negative adapter at `strength` and the second
    without it (the `positive` adapters stay on in both). Without guidance (scale <= 1) the negative branch is
    not computed, so the LoRA changes nothing. Two half batches instead of one can move a pixel by one level
    through rounding.
    """
    if not hasattr(type(pipe), "do_classifier_free_guidance"):
        raise ValueError(f"a negative-branch LoRA needs classifier-free guidance; {type(pipe).__name__} has none")
    denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
    pipe.load_lora_weights(lora, adapter_name=NEGATIVE_ADAPTER)
    adapters = [*positive, NEGATIVE_ADAPTER]
    forward = denoiser.forward

    def branch_forward(*args, **kwargs):
        if not pipe.do_classifier_free_guidance:
            denoiser.set_adapters(adapters, [1.0] * len(positive) + [0.0])
            return forward(*args, **kwargs)
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        n = x.shape[0]
        parts = []
        for rows, weight in ((slice(0, n // 2), strength), (slice(n // 2, n), 0.0)):
            denoiser.set_adapters(adapters, [1.0] * len(positive) + [weight])
            parts.append(forward(*take_rows(args, rows, n), **take_rows(kwargs, rows, n)))
        return _cat(parts)

    denoiser.forward = branch_forward
    try:
        yield
    finally:
        del denoiser.forward  # the class's forward again
        pipe.delete_adapters(NEGATIVE_ADAPTER)


def generate(pipe, prompts: str | Sequence[str], seeds: Sequence[int], steps: int, guidance_scale: float,
             lora: LoraSource | None = None, batch_size: int = 64, threads: int | None = None,
             size: int | None = None, negative_lora: LoraSource | None = None,
             negative_strength: float = 1.0) -> list[Image.Image]:
    """One image per seed, `prompts[i]` for `seeds[i]` (a single prompt is used for all seeds).

    `lora` (a LoRA file or state dict that `load_lora_weights` accepts) is applied for this call only;
    `negative_lora` (same forms) only to the unconditional branch of guidance, at `negative_strength`
    (`negative_branch`). `threads` sets torch's CPU threads for the call (None: leave as is). `size`: square
    side in pixels (default: the model's native size).
    """
    prompts = [prompts] * len(seeds) if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds")
    extra = dict(family_of(pipe).call_options, **({} if size is None else {"height": size, "width": size}))
    images: list[Image.Image] = []
    with sampling(pipe, lora, threads, negative_lora, negative_strength):
        for start in range(0, len(seeds), batch_size):
            chunk = slice(start, start + batch_size)
            generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[chunk]]
            with torch.inference_mode():
                out = pipe(prompts[chunk], num_inference_steps=steps, guidance_scale=guidance_scale,
                           generator=generators, **extra)
            images.extend(out.images)
    return images
