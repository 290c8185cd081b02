"""Which family a model is (SD1.5/SDXL UNet, SD3, Flux) and how SD3/Flux components are loaded.

The family comes from the pipeline class in `model_index.json` (folder or hub id) or, for a single
`.safetensors` file, from its tensor names: SD3's original layout has `joint_blocks.*`, Flux's (BFL) has
`double_blocks.*` (either may carry ComfyUI's `model.diffusion_model.` prefix), and a diffusers-format
transformer file has `transformer_blocks.*` (Flux also `single_transformer_blocks.*`). Anything else is
left to the SD1.5/SDXL loader, which reports what it cannot load.

A single SD3/Flux file holds the transformer (an all-in-one SD3 file also holds encoders; the transformer
is what is read): the VAE, text encoders, tokenizers and scheduler come from `model_config`, the diffusers
pipeline (folder or hub id) of the same family it was fine-tuned from. Original-layout files are converted
by diffusers' `from_single_file` (`convert_sd3_transformer_checkpoint_to_diffusers`,
`convert_flux_transformer_checkpoint_to_diffusers`, which assumes Flux.1's width 3072, as every Flux.1 has);
diffusers-format files load as they are.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

from ..fingerprint import file_fingerprint
from .loading import Components, freeze, resolve_model
from .single_file import SINGLE_FILE_SUFFIXES, checkpoint_keys

FLOW_PIPELINES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
LDM_PREFIX = "model.diffusion_model."


def model_family(model: str) -> str:
    """'sd3', 'flux', or 'unet' (SD1.5/SDXL, and whatever the SD loader will refuse with its own message)."""
    location = resolve_model(model)
    path = Path(location)
    if path.suffix in SINGLE_FILE_SUFFIXES:
        return single_file_family(path)
    index = _pipeline_index(location)
    return FLOW_PIPELINES.get(index.get("_class_name", ""), "unet")


def single_file_family(path: Path) -> str:
    try:
        keys = checkpoint_keys(path)
    except ValueError:
        return "unet"
    names = {k[len(LDM_PREFIX):] if k.startswith(LDM_PREFIX) else k for k in keys}
    if any(k.startswith("joint_blocks.") for k in names):
        return "sd3"
    if any(k.startswith(("double_blocks.", "single_transformer_blocks.")) for k in names):
        return "flux"
    if any(k.startswith("transformer_blocks.") and ".attn.add_q_proj." in k for k in names):
        return "sd3"
    return "unet"


def _pipeline_index(location: str) -> dict:
    """model_index.json of a folder or hub id; {} when there is none to read (the SD loader explains)."""
    folder = Path(location)
    if folder.is_dir():
        index = folder / "model_index.json"
        return json.loads(index.read_text()) if index.exists() else {}
    if folder.exists() or location.startswith((".", "/", "~")) or location.count("/") != 1:
        return {}
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(location, "model_index.json")).read_text())
    except Exception:  # noqa: BLE001 - offline, missing, gated: the SD loader's messages cover each
        return {}


def check_family_options(family: str, drop_t5: bool, quantize: str, device: torch.device) -> None:
    """Refuse, before anything loads, options this family cannot take or a quantised base that cannot be had."""
    if drop_t5 and family != "sd3":
        raise ValueError(f"config key 'drop_t5': only SD3/SD3.5 can run without T5; this model is {family}")
    if quantize == "no":
        return
    if family == "unet":
        raise ValueError("config key 'quantize': quantising the frozen base is offered for SD3/Flux transformers; "
                         "SD1.5/SDXL train in bf16 on consumer GPUs (use mixed_precision = 'bf16')")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"config key 'quantize': {quantize} needs bitsandbytes, an optional extra: "
                         "pip install 'prefalign[bnb]'")
    if device.type != "cuda":
        raise ValueError(f"config key 'quantize': bitsandbytes {quantize} runs on a CUDA GPU; this run is on {device.type}")


def quantization_config(quantize: str, compute_dtype: torch.dtype):
    """diffusers' bitsandbytes config: NF4 with double quantisation (QLoRA, Dettmers et al. 2023) or LLM.int8."""
    from diffusers import BitsAndBytesConfig

    if quantize == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_flow_components(model: str, family: str, vae: str | None = None, model_config: str | None = None,
                         drop_t5: bool = False, quantize: str = "no",
                         weight_dtype: torch.dtype = torch.float32) -> Components:
    """Frozen SD3/Flux components (CPU, fp32; a quantised transformer goes straight to the GPU)."""
    location = resolve_model(model)
    path = Path(location)
    single = path.suffix in SINGLE_FILE_SUFFIXES
    source = location
    if single:
        if model_config is None:
            raise ValueError(f"config key 'model_config': {path} is a single-file {family} transformer; pass the "
                             f"diffusers pipeline it was fine-tuned from (folder or hub id) for its VAE, text encoders "
                             "and scheduler")
        index = _pipeline_index(model_config)
        if index and FLOW_PIPELINES.get(index.get("_class_name")) != family:
            raise ValueError(f"config key 'model_config': {path} is a {family} transformer but {model_config} is not a "
                             f"{family} pipeline")
        source = model_config
    local = Path(source).is_dir()
    extra: dict[str, Any] = {"local_files_only": True} if local else {}
    parts = _encoders(family, source, drop_t5, extra)
    parts["denoiser"] = _transformer(family, path if single else None, source, quantize, weight_dtype, extra)
    freeze(parts, vae)
    return Components(name=model, architecture=family, hash=file_fingerprint(location), quantized=quantize != "no",
                      **parts)


def _transformer(family: str, single_file: Path | None, source: str, quantize: str, weight_dtype: torch.dtype,
                 extra: dict[str, Any]):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel
    kwargs: dict[str, Any] = dict(extra, torch_dtype=torch.float32)
    if quantize != "no":
        kwargs.update(quantization_config=quantization_config(quantize, weight_dtype), torch_dtype=weight_dtype)
    if single_file is None:
        return cls.from_pretrained(source, subfolder="transformer", **kwargs)
    try:
        return cls.from_single_file(str(single_file), config=source, subfolder="transformer", **kwargs)
    except Exception as e:  # noqa: BLE001 - diffusers raises many kinds; all mean the file does not fit
        raise ValueError(f"config key 'model': could not load {single_file} as a {family} transformer with the "
                         f"architecture of {source}: {type(e).__name__}: {e}") from None


def _encoders(family: str, source: str, drop_t5: bool, extra: dict[str, Any]) -> dict[str, Any]:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    def tokenizer(sub: str):
        return AutoTokenizer.from_pretrained(source, subfolder=sub, **extra)

    if family == "sd3":
        encoders = [CLIPTextModelWithProjection.from_pretrained(source, subfolder=sub, **extra)
                    for sub in ("text_encoder", "text_encoder_2")]
        if not drop_t5:
            encoders.append(T5EncoderModel.from_pretrained(source, subfolder="text_encoder_3", **extra))
        tokenizers = [tokenizer("tokenizer"), tokenizer("tokenizer_2"), tokenizer("tokenizer_3")]
    else:
        encoders = [CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **extra),
                    T5EncoderModel.from_pretrained(source, subfolder="text_encoder_2", **extra)]
        tokenizers = [tokenizer("tokenizer"), tokenizer("tokenizer_2")]
    return dict(vae=AutoencoderKL.from_pretrained(source, subfolder="vae", **extra), text_encoders=encoders,
                tokenizers=tokenizers,
                scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler", **extra))
