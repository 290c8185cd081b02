"""LoRA on a diffusers denoiser through PEFT: the default targets of each family, attach, switch off for the
reference, and the file's key names (the one place they are written).

File formats, chosen so that stock ComfyUI and diffusers' `load_lora_weights` both load them:
- SD1.5/SDXL: kohya names `lora_unet_<module path with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`.
- SD3/Flux: diffusers names `transformer.<module path>.lora_A.weight` / `.lora_B.weight`, the format of
  diffusers' `save_lora_weights`. ComfyUI maps `transformer.*` for both families (comfy/lora.py
  `model_lora_keys_unet`, through `comfy.utils.mmdit_to_diffusers` / `flux_to_diffusers`, which slice the
  fused qkv and Flux's `linear1`). diffusers' SD3 loader refuses keys without "lora" (an `.alpha` key), so
  the trained scale alpha/rank is folded into lora_B: both loaders then apply scale 1, the same update.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

ADAPTER = "default"


#: attention projections of the UNet's transformer blocks (the Diffusion-DPO LoRA)
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: MMDiT blocks: image and text attention (SD3.5's second attention `attn2` too) and both MLPs
MMDIT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                 "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
#: Flux adds its single blocks' MLP input and fused output (`proj_out`, which also names the final projection;
#: SimpleTuner's "all+ffs" targets the same)
DEFAULT_TARGETS = {"sd15": UNET_TARGETS, "sdxl": UNET_TARGETS, "sd3": MMDIT_TARGETS,
                   "flux": MMDIT_TARGETS + ("proj_mlp", "proj_out")}
TRANSFORMER_PREFIX = "transformer"


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    target_modules: tuple[str, ...]

    @classmethod
    def from_config(cls, config, architecture: str = "sd15") -> "LoraSpec":
        """The LoRA a run's `TrainConfig` asks for (the CLI and the ComfyUI node both build it here); without
        `target_modules`, the family's defaults (the UNet's for families this file does not know)."""
        targets = config.target_modules or DEFAULT_TARGETS.get(architecture, UNET_TARGETS)
        return cls(config.rank, config.alpha, tuple(targets))


def attach_lora(denoiser: nn.Module, spec: LoraSpec, seed: int = 0) -> None:
    """Freeze the denoiser and add a LoRA adapter with B = 0 (policy == base at step 0) and A drawn from `seed`."""
    from peft import LoraConfig

    denoiser.requires_grad_(False)
    config = LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, init_lora_weights="gaussian", target_modules=list(spec.target_modules)
    )
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            denoiser.add_adapter(config, adapter_name=ADAPTER)
    except ValueError as e:
        raise ValueError(f"config key 'target_modules': {e}") from None
    for name, param in denoiser.named_parameters():
        param.requires_grad_(".lora_" in name)


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[None]:
    """Switch every LoRA layer off without touching `requires_grad` (unlike peft's disable_adapters)."""
    layers = _lora_layers(model)
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer in layers:
            layer._disable_adapters = False


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter's parameters by module path (`…to_q.lora_A.default.weight`)."""
    return {name: p for name, p in model.named_parameters() if ".lora_" in name}


def kohya_state_dict(model: nn.Module, alpha: float, prefix: str = "lora_unet") -> dict[str, Tensor]:
    """kohya names that ComfyUI, A1111/Forge and diffusers load: `lora_unet_<path with _>.lora_down.weight`,
    `.lora_up.weight` and `.alpha` (the alpha trained with, not the rank)."""
    out: dict[str, Tensor] = {}
    for name, param in lora_parameters(model).items():
        module, kind = name.split(".lora_", 1)
        part = {"A": "lora_down", "B": "lora_up"}[kind.split(".", 1)[0]]
        key = f"{prefix}_{module.replace('.', '_')}"
        out[f"{key}.{part}.weight"] = param.detach().float().cpu().contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(alpha))
    return out


def diffusers_lora_tensors(module: str, down: Tensor, up: Tensor, scale: float,
                           prefix: str = TRANSFORMER_PREFIX) -> dict[str, Tensor]:
    """One layer's LoRA under diffusers/PEFT names, `transformer.<module>.lora_A.weight` (down) and `.lora_B.weight`
    (up), with the scale alpha/rank folded into lora_B (both loaders then apply scale 1). The ComfyUI backend
    writes SD3/Flux files through this too."""
    return {f"{prefix}.{module}.lora_A.weight": down.detach().float().cpu().contiguous(),
            f"{prefix}.{module}.lora_B.weight": (up.detach().float().cpu() * scale).contiguous()}


def diffusers_state_dict(model: nn.Module, spec: LoraSpec, prefix: str = TRANSFORMER_PREFIX) -> dict[str, Tensor]:
    """Every adapted layer of a PEFT model as `diffusers_lora_tensors`."""
    parts: dict[str, dict[str, Tensor]] = {}
    for name, param in lora_parameters(model).items():
        module, kind = name.split(".lora_", 1)
        parts.setdefault(module, {})[kind.split(".", 1)[0]] = param
    out: dict[str, Tensor] = {}
    for module, ab in parts.items():
        out.update(diffusers_lora_tensors(module, ab["A"], ab["B"], spec.alpha / spec.rank, prefix))
    return out


def export_state_dict(model: nn.Module, spec: LoraSpec, architecture: str) -> dict[str, Tensor]:
    """The LoRA file's tensors for a model of `architecture` (see the module docstring)."""
    if architecture in ("sd3", "flux"):
        return diffusers_state_dict(model, spec)
    return kohya_state_dict(model, spec.alpha)
