"""The LoRA file: kohya names with alpha, plus metadata ComfyUI, A1111/Forge and kohya tools show."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .atomic import save_safetensors
from .config import TrainConfig

# kohya sd-scripts' names (library/sai_model_spec.py, flux_train_network.py / sd3_train_network.py)
SS_BASE = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0", "sd3": "sd3", "flux": "flux1"}
MODELSPEC = {"sd15": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora",
             "sd3": "stable-diffusion-3/lora", "flux": "flux-1/lora"}


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
        "prefalign.prediction_type": model_info.get("prediction_type", ""),
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
    if model_info.get("prediction_type") == "v_prediction":
        meta["ss_v_parameterization"] = "True"  # kohya's flag for v-prediction bases (SD2-768, v-pred SDXL)
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
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such LoRA file")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except Exception as e:  # safetensors reports a bad header with its own exception type
        raise ValueError(f"{path}: not a valid safetensors file ({e})") from e


LORA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")


def lora_target_shapes(model: torch.nn.Module, prefix: str = "lora_unet") -> dict[str, tuple[int, int]]:
    """kohya module name -> (in, out) features of every Linear/Conv2d of `model` a LoRA can patch."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    shapes: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if not name or ".lora_" in name or name.endswith(".base_layer"):  # peft's own sub-modules
            continue
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if isinstance(base, torch.nn.Linear):
            shapes[f"{prefix}_{name.replace('.', '_')}"] = (base.in_features, base.out_features)
        elif isinstance(base, torch.nn.Conv2d):
            shapes[f"{prefix}_{name.replace('.', '_')}"] = (base.in_channels, base.out_channels)
    return shapes


def lora_modules(weights: dict[str, torch.Tensor], path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """Group kohya keys by module: {module: {"lora_down.weight": ..., "lora_up.weight": ..., "alpha": ...}}."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        module, _, part = key.partition(".")
        if part not in LORA_PARTS:
            raise ValueError(f"{path}: not a kohya-format LoRA (unexpected key {key!r}; expected "
                             f"<module>.lora_down.weight / .lora_up.weight / .alpha)")
        modules.setdefault(module, {})[part] = tensor
    for module, parts in modules.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise ValueError(f"{path}: LoRA module {module} lacks its lora_down or lora_up weight")
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        if down.dim() < 2 or up.dim() < 2 or down.shape[0] != up.shape[1]:
            raise ValueError(f"{path}: LoRA module {module} is damaged: lora_down {tuple(down.shape)} and "
                             f"lora_up {tuple(up.shape)} do not fit together")
    return modules


def _describe_base(meta: dict[str, str] | None, model_info: dict[str, str] | None) -> str:
    trained = (meta or {}).get("prefalign.architecture") or (meta or {}).get("ss_base_model_version") or "?"
    trained_name = (meta or {}).get("prefalign.base_model") or (meta or {}).get("ss_sd_model_name") or ""
    this = (model_info or {}).get("architecture", "?")
    this_name = (model_info or {}).get("name", "")
    if trained == "?" and not trained_name:
        return f"this model is {this} {this_name}".rstrip()
    return f"the LoRA was trained for {trained} {trained_name}".rstrip() + f", this model is {this} {this_name}".rstrip()


def check_lora_matches(weights: dict[str, torch.Tensor], expected: dict[str, tuple[int, int]], path: str | Path,
                       meta: dict[str, str] | None = None, model_info: dict[str, str] | None = None) -> None:
    """Refuse a LoRA made for another base model, naming the first mismatch.

    `expected` maps kohya module names to (in, out) features (`lora_target_shapes`). Modules and
    their in/out sizes are compared, not the rank: any rank fits any base model.
    """
    modules = lora_modules(weights, path)
    where = _describe_base(meta, model_info)
    if not modules:
        raise ValueError(f"{path}: the file holds no LoRA weights")
    other = sorted(m for m in modules if not m.startswith("lora_unet_"))
    if other:
        raise ValueError(f"{path}: holds weights for modules outside the UNet (e.g. {other[0]}); PrefAlign "
                         "loads UNet LoRAs (lora_unet_*) only")
    unknown = sorted(set(modules) - set(expected))
    if unknown:
        raise ValueError(f"{path}: LoRA does not match this base model ({where}): {len(unknown)} of its "
                         f"{len(modules)} modules do not exist in it, e.g. {unknown[0]}")
    have = {m: lora_features(parts["lora_down.weight"], parts["lora_up.weight"]) for m, parts in modules.items()}
    wrong = misfits(have, expected)
    if wrong:
        raise ValueError(f"{path}: LoRA does not match this base model ({where}): {wrong[0]}")


def lora_features(down: torch.Tensor, up: torch.Tensor) -> tuple[int, int]:
    """The (in, out) features a module's down/up pair patches: what must fit the model, whatever the rank."""
    return down.shape[1], up.shape[0]


def misfits(have: dict[str, tuple[int, int]], expected: dict[str, tuple[int, int]]) -> list[str]:
    """One line per module whose (in, out) features differ from the model's, in name order."""
    return [f"module {m} has in/out features {h[0]}/{h[1]} in the LoRA, {expected[m][0]}/{expected[m][1]} in the model"
            for m, h in sorted(have.items()) if m in expected and h != expected[m]]


def load_lora_into(backend, path: str | Path) -> dict[str, str]:
    """Load a kohya LoRA file into `backend`'s adapter (e.g. to continue training it); returns its metadata.

    Checks first that it was made for this base model (`check_lora_matches`), then that it fits the
    adapter (same rank, modules within target_modules). Its alpha is kept: lora_up is rescaled so the
    adapter's alpha/rank gives the file's update. Adapter modules the file does not cover get a zero update.
    """
    from .models.lora import lora_parameters

    weights, meta = read_lora(path)
    model = backend.model
    check_lora_matches(weights, lora_target_shapes(model), path, meta, backend.model_info())
    modules = lora_modules(weights, path)
    params = lora_parameters(model)
    by_module: dict[str, dict[str, str]] = {}
    for name in params:
        module, _, rest = name.partition(".lora_")
        by_module.setdefault(f"lora_unet_{module.replace('.', '_')}", {})[rest.split(".", 1)[0]] = name
    outside = sorted(set(modules) - set(by_module))
    if outside:
        raise ValueError(f"{path}: LoRA patches modules this run's adapter does not have (e.g. {outside[0]}); "
                         "add them to target_modules")
    our_rank = params[next(iter(by_module.values()))["A"]].shape[0]
    our_alpha = float(backend.lora.alpha)
    state = {name: p.detach().clone() for name, p in params.items()}
    for module, names in by_module.items():
        if module not in modules:
            state[names["B"]].zero_()
            continue
        down, up = modules[module]["lora_down.weight"], modules[module]["lora_up.weight"]
        if down.shape[0] != our_rank:
            raise ValueError(f"{path}: LoRA has rank {down.shape[0]}, this run's adapter rank {our_rank}; "
                             f"set rank = {down.shape[0]}")
        alpha = float(modules[module].get("alpha", torch.tensor(float(down.shape[0]))).item())
        a, b = state[names["A"]], state[names["B"]]
        state[names["A"]] = down.to(a.dtype).reshape(a.shape)
        state[names["B"]] = (up.float() * (alpha / our_alpha)).to(b.dtype).reshape(b.shape)
    backend.load_adapter_state_dict(state)
    return meta
