"""Loading the shipped toy model and sampling from it deterministically on CPU (DDIM, eta 0).

Besides a LoRA on the whole model, a *negative* LoRA can be applied to the unconditional branch of
classifier-free guidance only (Diffusion-NPO, Wang et al., ICLR 2025; G-U-N/Diffusion-NPO
`pipeline_stable_diffusion_double_unet.py`: the unconditional prediction comes from
`negative_unet` = the positive model + the NPO LoRA, the conditional one from the positive model):

    eps = eps_{theta + npo}(x_t, "") + w * (eps_theta(x_t, c) - eps_{theta + npo}(x_t, ""))
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image
from torch import Tensor

#: Classifier-free guidance used for every toy evaluation unless told otherwise.
GUIDANCE_SCALE = 3.0
LoraSource = str | os.PathLike | dict[str, Tensor]
_LORA, _NEGATIVE_LORA = "toy_sample_lora", "toy_negative_lora"


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
    lora: LoraSource | None = None,
    guidance_scale: float = GUIDANCE_SCALE,
    batch_size: int = 64,
    threads: int | None = 1,
    negative_lora: LoraSource | None = None,
    negative_strength: float = 1.0,
) -> list[Image.Image]:
    """One image per seed, `prompts[i]` for `seeds[i]` (a single prompt is used for all seeds).

    Each image's starting noise comes from its own seed, so an image does not depend on the batch
    it is drawn in. `lora` (a LoRA file/folder or state dict that `load_lora_weights` accepts) is
    applied to the whole model for this call only; `negative_lora` (same forms) only to the
    unconditional branch of classifier-free guidance, at `negative_strength` (there the two branches run as
    separate batches, which can move a pixel by one level through rounding). A pipeline passed in
    is left as it was. `threads` sets torch's CPU threads for the call (None: leave as is); the toy
    model is so small that one thread is fastest, and on a busy 2-core machine two threads were 25x
    slower than one.
    """
    prompts = [prompts] * len(seeds) if isinstance(prompts, str) else list(prompts)
    if negative_strength == 0.0:
        negative_lora = None  # plain sampling exactly, as the ComfyUI node at strength 0
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds")
    base = pipeline_or_path if isinstance(pipeline_or_path, StableDiffusionPipeline) else load_toy_pipeline(pipeline_or_path)
    pipe = StableDiffusionPipeline(
        **{**base.components, "scheduler": DDIMScheduler.from_config(base.scheduler.config)},
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    loaded = [name for name, source in ((_LORA, lora), (_NEGATIVE_LORA, negative_lora)) if source is not None]
    for name, source in ((_LORA, lora), (_NEGATIVE_LORA, negative_lora)):
        if source is not None:
            pipe.load_lora_weights(source, adapter_name=name)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        images: list[Image.Image] = []
        for start in range(0, len(seeds), batch_size):
            chunk = slice(start, start + batch_size)
            generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[chunk]]
            with torch.inference_mode():
                if negative_lora is None:
                    images.extend(pipe(prompts[chunk], num_inference_steps=steps, guidance_scale=guidance_scale,
                                       generator=generators, eta=0.0).images)
                else:
                    images.extend(_sample_negative_branch(pipe, prompts[chunk], generators, steps, guidance_scale,
                                                          loaded, negative_strength))
        return images
    finally:
        torch.set_num_threads(previous_threads)
        if loaded:
            pipe.delete_adapters(loaded)


def _sample_negative_branch(pipe: StableDiffusionPipeline, prompts: list[str], generators: list[torch.Generator],
                            steps: int, guidance_scale: float, adapters: list[str], strength: float) -> list[Image.Image]:
    """DDIM (eta 0) with the negative adapter at `strength` in the unconditional branch and off in the
    conditional one; the same noise, timesteps and decoding as `StableDiffusionPipeline.__call__`."""
    device, unet = pipe.device, pipe.unet
    cond, uncond = pipe.encode_prompt(prompts, device, 1, True)
    size = unet.config.sample_size * pipe.vae_scale_factor
    latents = pipe.prepare_latents(len(prompts), unet.config.in_channels, size, size, cond.dtype, device, generators)
    pipe.scheduler.set_timesteps(steps, device=device)
    weights = {branch: [strength if name == _NEGATIVE_LORA and branch == "uncond" else
                        0.0 if name == _NEGATIVE_LORA else 1.0 for name in adapters] for branch in ("uncond", "cond")}
    for t in pipe.scheduler.timesteps:
        x = pipe.scheduler.scale_model_input(latents, t)
        unet.set_adapters(adapters, weights["uncond"])
        eps_uncond = unet(x, t, encoder_hidden_states=uncond, return_dict=False)[0]
        unet.set_adapters(adapters, weights["cond"])
        eps_cond = unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]
        eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        latents = pipe.scheduler.step(eps, t, latents, eta=0.0, generator=generators, return_dict=False)[0]
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False, generator=generators)[0]
    return pipe.image_processor.postprocess(decoded, output_type="pil", do_denormalize=[True] * len(prompts))
