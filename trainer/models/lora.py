"""LoRA on a diffusers UNet through PEFT: attach, switch off for the reference, export kohya names."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

ADAPTER = "default"


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    target_modules: tuple[str, ...]

    @classmethod
    def from_config(cls, config) -> "LoraSpec":
        """The LoRA a run's `TrainConfig` asks for (the CLI and the ComfyUI node both build it here)."""
        return cls(config.rank, config.alpha, tuple(config.target_modules))


def attach_lora(unet: nn.Module, spec: LoraSpec, seed: int = 0) -> None:
    """Freeze the UNet and add a LoRA adapter with B = 0 (policy == base at step 0) and A drawn from `seed`."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, init_lora_weights="gaussian", target_modules=list(spec.target_modules)
    )
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet.add_adapter(config, adapter_name=ADAPTER)
    except ValueError as e:
        raise ValueError(f"config key 'target_modules': {e}") from None
    for name, param in unet.named_parameters():
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
