"""Resolve a model name to diffusers components: tiny/toy built-ins, a pipeline folder, a hub id or a single file."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .single_file import SINGLE_FILE_SUFFIXES, load_single_file
from ..fingerprint import file_fingerprint
from .tiny import TINY_MODELS, tiny_model_path


@dataclass
class Components:
    """The parts of a pipeline the trainer uses (SD1.5/SDXL here; SD3/Flux from `flow_loading`)."""

    name: str
    denoiser: Any  # UNet2DConditionModel, SD3Transformer2DModel or FluxTransformer2DModel
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    scheduler: Any
    architecture: str  # "sd15", "sdxl", "sd3" or "flux"
    hash: str
    quantized: bool = False  # the frozen denoiser was loaded quantised (placed and typed by its loader)


def resolve_model(model: str) -> str:
    """Built-in names to their folders; anything else unchanged (folder, file or hub id)."""
    if model in TINY_MODELS:
        return str(tiny_model_path(model))
    if model == "toy":
        from ..toy import toy_model_path

        return str(toy_model_path())
    return model


def check_model_source(location: str, label: str = "config key 'model'") -> None:
    """Refuse, before anything loads, a model that is neither built in, an existing file or folder, nor a
    hub id the hub can serve now (`label` names the option in the message)."""
    from ..hub import hub_refusal, looks_like_hub_id

    if location in TINY_MODELS or location == "toy" or Path(location).exists():
        return
    if not looks_like_hub_id(location):
        raise ValueError(f"{label}: {location}: no such file or folder (looked at {Path(location).absolute()}), and "
                         f"not a hub id (owner/name); built in: toy, {', '.join(TINY_MODELS)}")
    refusal = hub_refusal(location)
    if refusal is not None:
        raise ValueError(f"{label}: {refusal}")


def load_components(model: str, vae: str | None = None, model_config: str | None = None) -> Components:
    """Load (frozen, fp32, CPU) components of an SD1.5 or SDXL model.

    `model_config` (a diffusers folder or hub id) describes a single-file checkpoint's architecture; unused otherwise.
    """
    location = resolve_model(model)
    path = Path(location)
    if path.suffix in SINGLE_FILE_SUFFIXES:
        parts = _from_single_file(path, model_config)
    elif path.is_dir() and not (path / "model_index.json").exists():
        raise ValueError(f"config key 'model': {path} is a folder but not a diffusers pipeline (no model_index.json)")
    else:
        parts = _from_pretrained(location)
    freeze(parts, vae)
    sdxl = getattr(parts["denoiser"].config, "addition_embed_type", None) == "text_time"
    return Components(name=model, architecture="sdxl" if sdxl else "sd15", hash=file_fingerprint(location), **parts)


def freeze(parts: dict[str, Any], vae: str | None) -> None:
    """Load the `vae` override (a diffusers folder or hub id) into `parts`, then freeze every module in eval mode."""
    if vae is not None:
        from diffusers import AutoencoderKL

        parts["vae"] = AutoencoderKL.from_pretrained(vae)
    for module in [parts["denoiser"], parts["vae"], *parts["text_encoders"]]:
        module.requires_grad_(False)
        module.eval()


def _from_pretrained(location: str) -> dict[str, Any]:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    index = _model_index(location)
    encoders, tokenizers = [CLIPTextModel.from_pretrained(location, subfolder="text_encoder")], [
        AutoTokenizer.from_pretrained(location, subfolder="tokenizer")
    ]
    if "text_encoder_2" in index:
        encoders.append(CLIPTextModelWithProjection.from_pretrained(location, subfolder="text_encoder_2"))
        tokenizers.append(AutoTokenizer.from_pretrained(location, subfolder="tokenizer_2"))
    return dict(
        denoiser=UNet2DConditionModel.from_pretrained(location, subfolder="unet"),
        vae=AutoencoderKL.from_pretrained(location, subfolder="vae"),
        text_encoders=encoders,
        tokenizers=tokenizers,
        scheduler=DDPMScheduler.from_pretrained(location, subfolder="scheduler"),
    )


def _model_index(location: str) -> dict:
    path = Path(location) / "model_index.json"
    if path.exists():
        return json.loads(path.read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(location, "model_index.json")).read_text())


def _from_single_file(path: Path, model_config: str | None = None) -> dict[str, Any]:
    """An A1111/ComfyUI-style checkpoint (see `single_file`); SDXL is recognised by its second text encoder."""
    return load_single_file(path, model_config)
