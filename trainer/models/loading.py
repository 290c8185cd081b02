"""Resolve a model name to diffusers components: tiny/toy built-ins, a pipeline folder, a hub id or a single file."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .single_file import SINGLE_FILE_SUFFIXES, load_single_file
from .tiny import TINY_MODELS, tiny_model_path


@dataclass
class Components:
    """The parts of an SD1.5/SDXL pipeline the trainer uses."""

    name: str
    unet: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    scheduler: Any
    architecture: str  # "sd15" or "sdxl"
    hash: str


def resolve_model(model: str) -> str:
    """Built-in names to their folders; anything else unchanged (folder, file or hub id)."""
    if model in TINY_MODELS:
        return str(tiny_model_path(model))
    if model == "toy":
        from ..toy import toy_model_path

        return str(toy_model_path())
    return model


def model_hash(location: str) -> str:
    """A short content hash of the weights (file, or the unet folder's safetensors), else of the name."""
    path = Path(location)
    files = [path] if path.is_file() else sorted((path / "unet").glob("*.safetensors")) if path.is_dir() else []
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            digest.update(f.read(1 << 20))  # first MiB of each file: cheap and content-dependent
        digest.update(str(file.stat().st_size).encode())
    if not files:
        digest.update(location.encode())
    return digest.hexdigest()[:16]


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
    if vae is not None:
        from diffusers import AutoencoderKL

        parts["vae"] = AutoencoderKL.from_pretrained(vae)
    for module in [parts["unet"], parts["vae"], *parts["text_encoders"]]:
        module.requires_grad_(False)
        module.eval()
    sdxl = getattr(parts["unet"].config, "addition_embed_type", None) == "text_time"
    return Components(name=model, architecture="sdxl" if sdxl else "sd15", hash=model_hash(location), **parts)


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
        unet=UNet2DConditionModel.from_pretrained(location, subfolder="unet"),
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
