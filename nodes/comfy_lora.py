"""The LoRA as ComfyUI weight wrappers: one small trainable module per targeted weight, and its file names.

File names: kohya `lora_unet_<ComfyUI module path with _>` (ComfyUI's key map has it for every model: comfy/lora.py
`model_lora_keys_unet`), or, for families diffusers also runs (SD3, Flux), diffusers' `transformer.<module>`
names written by the trainer's `diffusers_lora_tensors`. ComfyUI's own converters (`comfy.utils.mmdit_to_diffusers`,
`flux_to_diffusers`, the maps its LoRA loader uses) say which diffusers modules are which rows of a ComfyUI weight:
a fused qkv (or Flux's `linear1`) is several diffusers layers that share the LoRA's down matrix, each with its rows
of the up matrix.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from ..trainer.models.lora import diffusers_lora_tensors

PREFIX = "diffusion_model."

#: diffusers module name and the rows of the ComfyUI weight it holds
DiffusersParts = list[tuple[str, slice]]


class LoraWeight(nn.Module):
    """w -> w + (alpha / rank) * up @ down, or w itself while disabled. A ComfyUI weight wrapper.

    The factors stay float32 whatever the base weights are (fp8/fp16/bf16 from Load Diffusion Model): ComfyUI
    casts a weight to the compute dtype before its wrappers run, and the update joins it in that dtype."""

    def __init__(self, shape: torch.Size, rank: int, alpha: float, generator: torch.Generator | None = None) -> None:
        super().__init__()
        out_dim, in_dim = shape[0], int(math.prod(shape[1:]))
        self.shape = tuple(shape)
        self.rank, self.alpha = rank, float(alpha)
        self.lora_down = nn.Parameter(torch.randn(rank, in_dim, generator=generator) / rank)
        self.lora_up = nn.Parameter(torch.zeros(out_dim, rank))  # zero: the policy starts as the base model
        self.enabled = True

    def __call__(self, w: Tensor) -> Tensor:
        if not self.enabled:
            return w
        diff = (self.lora_up @ self.lora_down) * (self.alpha / self.rank)
        return w + diff.reshape(w.shape).to(w.dtype)

    def passive_memory_usage(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def move_to(self, device) -> int:
        self.to(device=device)
        return self.passive_memory_usage()


def kohya_name(module_key: str) -> str:
    """`diffusion_model.a.b.c` -> `lora_unet_a_b_c` (ComfyUI maps this for every model family)."""
    if not module_key.startswith(PREFIX):
        raise ValueError(f"not a diffusion-model key: {module_key}")
    return "lora_unet_" + module_key[len(PREFIX):].replace(".", "_")


def matches_target(module_key: str, targets: Sequence[str]) -> bool:
    return any(module_key == t or module_key.endswith("." + t) for t in targets)


def diffusers_parts(converter_map: dict, modules: dict[str, int]) -> dict[str, DiffusersParts]:
    """For each ComfyUI module (`diffusion_model.x.y` -> its weight's rows), the diffusers modules that hold exactly
    its rows, read from a ComfyUI converter map (diffusers key -> ComfyUI key, or (key, (dim, offset, size)), or
    (key, None, function)) made with `output_prefix="diffusion_model."`. A module the map does not cover exactly
    (rows missing, overlapping, or transformed by a function) is left out."""
    found: dict[str, DiffusersParts] = {}
    for diffusers_key, target in converter_map.items():
        if not diffusers_key.endswith(".weight"):
            continue
        name = diffusers_key[: -len(".weight")]
        if isinstance(target, str):
            key, rows = target, None
        elif len(target) == 2 and target[1] is not None and target[1][0] == 0:
            key, rows = target[0], slice(target[1][1], target[1][1] + target[1][2])
        else:  # a transformed copy (SD3's last adaLN: scale/shift swapped): not a plain LoRA of these rows
            found.setdefault(target[0][: -len(".weight")], []).append((name, None))
            continue
        module = key[: -len(".weight")]
        if module in modules:
            found.setdefault(module, []).append((name, rows if rows is not None else slice(0, modules[module])))
    exact = {}
    for module, parts in found.items():
        if any(rows is None for _, rows in parts):
            continue
        parts.sort(key=lambda p: p[1].start)
        starts, stops = [p[1].start for p in parts], [p[1].stop for p in parts]
        if starts[0] == 0 and stops[-1] == modules[module] and starts[1:] == stops[:-1]:
            exact[module] = parts
    return exact


def export_names(adapters: dict[str, LoraWeight], diffusers: dict[str, DiffusersParts] | None) -> dict[str, Tensor]:
    """The LoRA file's tensors: diffusers names where `diffusers` gives a module's parts, kohya names (with the
    trained alpha) for the others."""
    out: dict[str, Tensor] = {}
    for name, a in adapters.items():
        down, up = a.lora_down.detach().float().cpu(), a.lora_up.detach().float().cpu()
        parts = (diffusers or {}).get(name)
        if parts is not None:
            for module, rows in parts:  # each diffusers layer its own copy of the shared down matrix
                out.update(diffusers_lora_tensors(module, down.clone(), up[rows], a.alpha / a.rank))
            continue
        key = kohya_name(name)
        if len(a.shape) > 2:  # conv: kohya keeps conv shapes
            down = down.reshape(a.rank, *a.shape[1:])
            up = up.reshape(a.shape[0], a.rank, *[1] * (len(a.shape) - 2))
        out[f"{key}.lora_down.weight"] = down.contiguous()
        out[f"{key}.lora_up.weight"] = up.contiguous()
        out[f"{key}.alpha"] = torch.tensor(a.alpha)
    return out


def linear_layers(named_modules: Iterable[tuple[str, nn.Module]]) -> list[str]:
    """ComfyUI module paths a LoRA can patch (modules with a weight wrapper hook and a 2-D or conv weight)."""
    return [name for name, module in named_modules
            if hasattr(module, "weight_function") and name.startswith(PREFIX)
            and getattr(module, "weight", None) is not None and module.weight.dim() >= 2]
