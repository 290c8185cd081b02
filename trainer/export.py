"""The LoRA file: kohya names with alpha, plus metadata ComfyUI, A1111/Forge and kohya tools show."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .atomic import save_safetensors
from .config import TrainConfig

SS_BASE = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}
MODELSPEC = {"sd15": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}


def lora_metadata(config: TrainConfig, model_info: dict[str, str], steps: int, metrics: dict[str, float]) -> dict[str, str]:
    """String metadata: ours under `prefalign.*`, kohya's `ss_*` and `modelspec.*` where they apply."""
    arch = model_info.get("architecture", "")
    meta = {
        "prefalign.method": config.method,
        "prefalign.method_args": json.dumps(config.method_args, sort_keys=True),
        "prefalign.steps": str(steps),
        "prefalign.dataset": config.data,
        "prefalign.base_model": model_info.get("name", ""),
        "prefalign.base_model_hash": model_info.get("hash", ""),
        "prefalign.architecture": arch,
        "prefalign.metrics": json.dumps({k: round(v, 6) for k, v in metrics.items()}, sort_keys=True),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": str(config.alpha),
        "ss_sd_model_name": model_info.get("name", ""),
        "ss_new_sd_model_hash": model_info.get("hash", ""),
        "ss_steps": str(steps),
        "ss_learning_rate": str(config.learning_rate),
        "ss_resolution": f"({config.resolution}, {config.resolution})",
        "ss_training_comment": f"PrefAlign {config.method} on {config.data}",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": f"PrefAlign {config.method}",
    }
    if arch in SS_BASE:
        meta["ss_base_model_version"] = SS_BASE[arch]
        meta["modelspec.architecture"] = MODELSPEC[arch]
    return meta


def write_lora(path: Path, weights: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    save_safetensors(path, weights, metadata)
    return path


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Weights and metadata of a LoRA file (safetensors only)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: LoRA files are read from .safetensors only")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return load_file(str(path)), meta


def check_lora_matches(weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: str | Path) -> None:
    """Refuse a LoRA trained for another base model, naming the first mismatch."""
    missing = sorted(set(expected) - set(weights))
    unknown = sorted(set(weights) - set(expected))
    if unknown or missing:
        raise ValueError(f"{path}: LoRA does not match this base model: "
                         f"{len(unknown)} unknown keys (e.g. {unknown[:1]}), {len(missing)} missing (e.g. {missing[:1]})")
    for key, tensor in weights.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(f"{path}: LoRA does not match this base model: {key} has shape "
                             f"{tuple(tensor.shape)}, the model needs {tuple(expected[key].shape)}")
