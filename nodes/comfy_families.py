"""What the Train node does differently per model family, in one table, keyed by ComfyUI's model detection.

ComfyUI's model detection gives every loaded MODEL a config class (`comfy/supported_models.py`: SD15, SDXL,
SD3, Flux, ...); a family is found by walking that class's MRO, so detected variants of a family (KOALA and
SSD-1B are SDXL, FluxSchnell is Flux, WAN22_T2V is WAN21_T2V) share its preset. Each preset gives:

- `targets`: the default LoRA layers, as suffixes of ComfyUI's own `diffusion_model.` module paths: the
  attention and MLP linears of the transformer blocks (UNet families: the attention projections of
  Diffusion-DPO's LoRA). Names from `comfy/ldm/*`: MMDiT `joint_blocks.N.{x,context}_block.{attn,attn2,mlp}`
  (`mmdit.py`), Flux/Chroma `double_blocks.N.{img,txt}_{attn,mlp}` and `single_blocks.N.linear{1,2}`
  (`flux/layers.py`, `chroma/layers.py`), Qwen-Image `transformer_blocks.N.attn.*` / `{img,txt}_mlp.net.*`
  (`qwen_image/model.py`), HiDream `{double,single}_stream_blocks.N.block.attn1.*` and the MoE feed-forwards'
  `w1/w2/w3` (`hidream/model.py`), Lumina 2 `layers.N.attention.{qkv,out}` / `feed_forward.w{1,2,3}` and its
  refiners (`lumina/model.py`), Wan `blocks.N.{self_attn,cross_attn}.{q,k,v,o}` / `ffn.{0,2}` (`wan/model.py`).
- `timestep_sampling`: as the family's reference training script draws timesteps (diffusers'
  `examples/dreambooth/train_dreambooth_lora_<family>.py` `--weighting_scheme` default: `logit_normal` for SD3,
  `none` = uniform for Flux, HiDream, Lumina 2 and Qwen-Image; uniform for the DDPM families and Wan). The shift
  is the model's own: the timesteps index its `model_sampling` sigma table.
- `guidance`: the value of the guidance input of guidance-distilled families (`extra_conds(guidance=...)`;
  ComfyUI's defaults: Flux 3.5 in `model_base.Flux`, Chroma 0 in `model_base.Chroma`); None: no such input.
- `in_place`: ComfyUI's code for the family updates activations in place (Flux's `+=`, Chroma's `addcmul_`), so
  training takes snapshots of what autograd saves (`comfy_checkpointing`); unknown families are treated so too.
- `pooled`: its text encoder gives a pooled vector (`pooled_output`; CLIP-L/G do, the T5 and LLM encoders of
  Chroma, Qwen-Image, Lumina 2 and Wan do not): RPO's prompt distances use it.
- `diffusers`: ComfyUI's converter from diffusers names (`comfy.utils.mmdit_to_diffusers` for SD3,
  `flux_to_diffusers` for Flux, the maps its LoRA loader uses): the file uses diffusers names, so it also loads
  with diffusers' `load_lora_weights`; the other families use kohya `lora_unet_` names.

A model of no family here takes the generic path: the UNet targets, or the ones the user types.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from ..trainer.models.lora import UNET_TARGETS


@dataclass(frozen=True)
class Family:
    name: str  # the LoRA file's `prefalign.architecture`
    label: str  # as the node's help names it
    configs: tuple[str, ...]  # ComfyUI config classes (comfy/supported_models.py) of this family
    targets: tuple[str, ...]
    timestep_sampling: str = "uniform"
    guidance: float | None = None
    in_place: bool = False
    pooled: bool = True
    diffusers: str | None = None


MMDIT = ("attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj", "mlp.fc1", "mlp.fc2")
FLUX = ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj", "img_mlp.0", "img_mlp.2", "txt_mlp.0",
        "txt_mlp.2", "linear1", "linear2")

FAMILIES = (
    Family("sd15", "SD1.5", ("SD15",), UNET_TARGETS),
    Family("sd2", "SD2", ("SD20",), UNET_TARGETS),
    Family("sdxl", "SDXL", ("SDXL",), UNET_TARGETS),
    Family("sdxl-refiner", "SDXL refiner", ("SDXLRefiner",), UNET_TARGETS),
    Family("sd3", "SD3/SD3.5", ("SD3",), MMDIT, timestep_sampling="logit_normal",
           diffusers="mmdit_to_diffusers"),
    Family("flux", "Flux.1 dev/schnell", ("Flux",), FLUX, guidance=3.5, in_place=True, diffusers="flux_to_diffusers"),
    Family("chroma", "Chroma", ("Chroma",), FLUX, guidance=0.0, in_place=True, pooled=False),
    Family("qwen_image", "Qwen-Image", ("QwenImage",),
           ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
            "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
            "txt_mlp.net.2"), pooled=False),
    Family("hidream", "HiDream", ("HiDream",),
           ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out", "attn1.to_q_t", "attn1.to_k_t", "attn1.to_v_t",
            "attn1.to_out_t", "w1", "w2", "w3")),
    Family("lumina2", "Lumina 2", ("Lumina2",),
           ("attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"), pooled=False),
    Family("wan", "Wan 2.x text-to-image (one frame)", ("WAN21_T2V",),
           ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k", "cross_attn.v",
            "cross_attn.o", "ffn.0", "ffn.2"), pooled=False),
)
_BY_CONFIG = {config: family for family in FAMILIES for config in family.configs}


def family_of(base_model) -> Family | None:
    """The family of a ComfyUI BaseModel, from its config class or the nearest base class in the table."""
    config_class = type(getattr(base_model, "model_config", None))
    for cls in config_class.__mro__:
        if cls.__name__ in _BY_CONFIG:
            return _BY_CONFIG[cls.__name__]
    return None


def architecture_of(base_model) -> str:
    """The LoRA file's architecture name: the family's, else ComfyUI's config class name in lower case."""
    family = family_of(base_model)
    return family.name if family is not None else type(getattr(base_model, "model_config", None)).__name__.lower()


def text_embeddings(family: Family | None) -> frozenset[str]:
    """The CLIP-space embeddings a family's encodings carry (`Backend.embeddings`): "prompt" when its text encoder
    gives a pooled vector. Unknown families are assumed to (a missing vector then stops at RPO's first step)."""
    return frozenset({"prompt"}) if family is None or family.pooled else frozenset()


def trained_guidance(base_model, requested: float | None) -> float | None:
    """The guidance value a guidance-distilled family trains at: `requested`, or (None) the family's default; None
    for the other families, whose models take no guidance input."""
    family = family_of(base_model)
    if family is None or family.guidance is None:
        return None
    return float(family.guidance if requested is None else requested)


def default_targets(base_model) -> tuple[str, ...]:
    family = family_of(base_model)
    return family.targets if family is not None else UNET_TARGETS


def presets_help() -> str:
    """One line per family: what `auto` targets mean (the node's tooltip)."""
    return "; ".join(f"{f.label}: {', '.join(f.targets)}" for f in FAMILIES if f.targets != UNET_TARGETS) + \
        f"; SD1.5/SD2/SDXL and any other model: {', '.join(UNET_TARGETS)}"


def layer_names(module_names: Iterable[str], limit: int = 60) -> str:
    """Linear layer paths with block numbers folded (`double_blocks.N.img_attn.qkv`), for a message."""
    folded = sorted({re.sub(r"\.\d+(?=\.|$)", ".N", name) for name in module_names})
    more = f" ... ({len(folded) - limit} more)" if len(folded) > limit else ""
    return ", ".join(folded[:limit]) + more
