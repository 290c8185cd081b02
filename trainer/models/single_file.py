"""A1111/ComfyUI-style single-file SD1.5/SDXL checkpoints (original LDM key names): load and write.

Loading goes through diffusers' `from_single_file`. Which architecture a file holds (block widths, layers,
text encoders) is not in the file, so diffusers needs a diffusers-format *config*: `model_config` names a
local pipeline folder (or hub id) to take it from; without one diffusers infers the standard SD1.5/SDXL
config from the keys and fetches it from the hub (once; it is cached after that).

`save_single_file` writes a diffusers SD1.5/SDXL pipeline folder as one original-format `.safetensors`
(the inverse of diffusers' LDM -> diffusers conversion), e.g. to hand a model to A1111 or ComfyUI.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD15_CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

_HINT = ("pass --model_config with a diffusers pipeline folder (or hub id) of the same architecture, "
         "e.g. the SD1.5/SDXL base model it was fine-tuned from")


class SingleFileError(ValueError):
    """A single-file checkpoint that cannot be loaded; the message names the file and what to pass."""


# --------------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------------
def checkpoint_keys(path: Path) -> list[str]:
    """The tensor names of a single-file `.safetensors` checkpoint (header only); clear errors otherwise."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise SingleFileError(f"config key 'model': checkpoint file {path} does not exist")
    if path.is_dir():
        raise SingleFileError(f"config key 'model': {path} is a folder, not a single-file checkpoint")
    if path.suffix != ".safetensors":
        raise SingleFileError(f"config key 'model': {path}: only .safetensors single files are loaded "
                              f"({path.suffix} files are pickles, which can run code); convert it to .safetensors first")
    try:
        with safe_open(str(path), "pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise SingleFileError(f"config key 'model': {path} is not a readable .safetensors file ({e})") from None


def detect_architecture(keys: list[str] | set[str], path: Path | str = "checkpoint") -> str:
    """'sdxl' (two text encoders under conditioner.embedders), 'sd15' (cond_stage_model CLIP) or an error."""
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise SingleFileError(f"config key 'model': {path} has no UNet weights ({UNET_PREFIX}*): not an SD1.5/SDXL "
                              "checkpoint in the original (A1111/ComfyUI) layout; a LoRA or a lone UNet/VAE cannot be trained from")
    if any(k.startswith(SDXL_OPEN_CLIP_PREFIX) for k in keys):
        return "sdxl"
    if any(k.startswith(SD15_CLIP_PREFIX) for k in keys):
        return "sd15"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise SingleFileError(f"config key 'model': {path} looks like SD2.x (OpenCLIP text encoder); only SD1.5 and SDXL are supported")
    raise SingleFileError(f"config key 'model': {path} has a UNet but no SD1.5 ({SD15_CLIP_PREFIX}*) or SDXL "
                          f"({SDXL_OPEN_CLIP_PREFIX}*) text encoder")


def load_single_file(path: str | Path, model_config: str | None = None) -> dict[str, Any]:
    """UNet, VAE, text encoders, tokenizers and scheduler of a single-file SD1.5/SDXL checkpoint (fp32, CPU)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    path = Path(path)
    keys = checkpoint_keys(path)
    architecture = detect_architecture(keys, path)
    sdxl = architecture == "sdxl"
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    extra: dict[str, Any] = {} if sdxl else {"safety_checker": None, "requires_safety_checker": False}
    if model_config is not None:
        _check_config(model_config, sdxl, path)
        extra["config"] = model_config
        if Path(model_config).is_dir():
            extra["local_files_only"] = True
    try:
        if sdxl and model_config is not None:  # diffusers tells SDXL's encoders apart by width: ambiguous if equal
            extra["text_encoder_2"] = _open_clip_from_ldm(path, model_config)
        pipe = cls.from_single_file(str(path), torch_dtype=torch.float32, **extra)
    except SingleFileError:
        raise
    except Exception as e:  # noqa: BLE001 - diffusers raises many kinds; all mean the same to the user
        where = f"with model_config {model_config!r}" if model_config else "(without model_config diffusers fetches its config from the hub)"
        raise SingleFileError(f"config key 'model': could not load single-file checkpoint {path} {where}: "
                              f"{type(e).__name__}: {e}\nTo load it offline, {_HINT}.") from e
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if sdxl else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if sdxl else [])
    return dict(denoiser=pipe.unet, vae=pipe.vae, text_encoders=encoders, tokenizers=tokenizers,
                scheduler=DDPMScheduler.from_config(dict(pipe.scheduler.config)))


def _check_config(model_config: str, sdxl: bool, path: Path) -> None:
    folder = Path(model_config)
    if folder.is_dir():
        index_file = folder / "model_index.json"
        if not index_file.exists():
            raise SingleFileError(f"config key 'model_config': {folder} is a folder but not a diffusers pipeline "
                                  f"(no model_index.json); needed to load {path}")
        config_sdxl = "text_encoder_2" in json.loads(index_file.read_text())
        if config_sdxl != sdxl:
            kinds = ("SDXL", "SD1.5") if sdxl else ("SD1.5", "SDXL")
            raise SingleFileError(f"config key 'model_config': {path} is {kinds[0]} but {folder} is an {kinds[1]} pipeline")
    elif model_config.startswith((".", "/", "~")) or model_config.count("/") != 1:
        raise SingleFileError(f"config key 'model_config': {model_config} is neither a folder nor a hub id "
                              f"(needed to load {path})")


def _open_clip_from_ldm(path: Path, model_config: str):
    """SDXL's second text encoder (OpenCLIP names in the file) as a CLIPTextModelWithProjection."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    local = Path(model_config).is_dir()
    config = CLIPTextConfig.from_pretrained(model_config, subfolder="text_encoder_2", local_files_only=local)
    model = CLIPTextModelWithProjection(config)
    with safe_open(str(path), "pt") as f:
        checkpoint = {k: f.get_tensor(k) for k in f.keys() if k.startswith(SDXL_OPEN_CLIP_PREFIX)}
    state = convert_open_clip_checkpoint(model, checkpoint, prefix=SDXL_OPEN_CLIP_PREFIX)
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise SingleFileError(f"config key 'model': {path}: SDXL second text encoder does not match model_config "
                              f"{model_config} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()


# --------------------------------------------------------------------------------------------------------
# writing: diffusers -> original LDM names
# --------------------------------------------------------------------------------------------------------
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet(rest: str) -> str:
    layer, _, param = rest.partition(".")
    if layer not in _UNET_RESNET:
        raise KeyError(rest)
    return f"{_UNET_RESNET[layer]}.{param}"


def unet_to_ldm(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """A diffusers UNet2DConditionModel state dict (SD1.5/SDXL layout) in LDM `openaimodel` names (no prefix)."""
    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        raise ValueError(f"layers_per_block must be one number for the LDM layout, got {per_block}")
    stride = per_block + 1
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        try:
            module, param = key.rsplit(".", 1)
            if module in _UNET_TOP:  # conv_in, time_embedding.linear_1, add_embedding.linear_2, ...
                new = f"{_UNET_TOP[module]}.{param}"
            elif parts[0] == "down_blocks":
                block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
                first = 1 + block * stride
                if kind == "resnets":
                    new = f"input_blocks.{first + index}.0.{_resnet(rest)}"
                elif kind == "attentions":
                    new = f"input_blocks.{first + index}.1.{rest}"
                elif kind == "downsamplers" and rest.startswith("conv."):
                    new = f"input_blocks.{first + per_block}.0.op.{rest[len('conv.'):]}"
                else:
                    raise KeyError(key)
            elif parts[0] == "mid_block":
                kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
                if kind == "resnets":
                    new = f"middle_block.{2 * index}.{_resnet(rest)}"
                elif kind == "attentions" and index == 0:
                    new = f"middle_block.1.{rest}"
                else:
                    raise KeyError(key)
            elif parts[0] == "up_blocks":
                block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
                first = block * stride
                if kind == "resnets":
                    new = f"output_blocks.{first + index}.0.{_resnet(rest)}"
                elif kind == "attentions":
                    new = f"output_blocks.{first + index}.1.{rest}"
                elif kind == "upsamplers" and rest.startswith("conv."):
                    with_attention = "CrossAttn" in config["up_block_types"][block]
                    new = f"output_blocks.{first + per_block}.{2 if with_attention else 1}.conv.{rest[len('conv.'):]}"
                else:
                    raise KeyError(key)
            else:
                raise KeyError(key)
        except (KeyError, ValueError, IndexError):
            raise ValueError(f"UNet weight {key!r} has no place in the SD1.5/SDXL LDM layout") from None
        out[new] = value
    return out


_VAE_SAME = ("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.", "decoder.conv_out.", "quant_conv.",
             "post_quant_conv.")
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_key(parts: list[str], n_up: int) -> str | None:
    key = ".".join(parts)
    if key.startswith(_VAE_SAME):
        return key
    if parts[1] == "conv_norm_out":
        return f"{parts[0]}.norm_out.{'.'.join(parts[2:])}"
    if parts[:2] == ["encoder", "down_blocks"]:
        block, kind, rest = int(parts[2]), parts[3], parts[4:]
        if kind == "resnets":
            return f"encoder.down.{block}.block.{'.'.join(rest)}"
        if kind == "downsamplers" and rest[:2] == ["0", "conv"]:
            return f"encoder.down.{block}.downsample.conv.{rest[2]}"
    if parts[:2] == ["decoder", "up_blocks"]:
        block, kind, rest = n_up - 1 - int(parts[2]), parts[3], parts[4:]
        if kind == "resnets":
            return f"decoder.up.{block}.block.{'.'.join(rest)}"
        if kind == "upsamplers" and rest[:2] == ["0", "conv"]:
            return f"decoder.up.{block}.upsample.conv.{rest[2]}"
    if parts[1:3] == ["mid_block", "resnets"]:
        return f"{parts[0]}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}"
    if parts[1:4] == ["mid_block", "attentions", "0"] and ".".join(parts[4:-1]) in _VAE_ATTENTION:
        return f"{parts[0]}.mid.attn_1.{_VAE_ATTENTION['.'.join(parts[4:-1])]}.{parts[-1]}"
    return None


def vae_to_ldm(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """A diffusers AutoencoderKL state dict in LDM `autoencoder` names (no prefix); attention as 1x1 convs."""
    n_up = len(config["up_block_types"])
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        try:
            new = _vae_key(parts, n_up)
        except (IndexError, ValueError):
            new = None
        if new is not None and parts[1:4] == ["mid_block", "attentions", "0"] and value.dim() == 2:
            value = value[:, :, None, None]  # linear -> 1x1 conv, as in the original weights
        if new is None:
            raise ValueError(f"VAE weight {key!r} has no place in the SD1.5/SDXL LDM layout")
        out[new.replace("conv_shortcut", "nin_shortcut")] = value
    return out


def clip_to_ldm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A transformers CLIPTextModel state dict in HF names under `text_model.` (as A1111 files keep them)."""
    out = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        out[key if key.startswith("text_model.") else f"text_model.{key}"] = value
    return out


_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def open_clip_to_ldm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A CLIPTextModelWithProjection state dict in OpenCLIP names (q/k/v fused into in_proj; projection transposed)."""
    state = {(k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v for k, v in state.items()}
    top = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
           "text_model.embeddings.position_embedding.weight": "positional_embedding",
           "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias"}
    out: dict[str, Tensor] = {}
    fused: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key in top:
            out[top[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif key.startswith("text_model.encoder.layers."):
            parts = key.split(".")
            index, layer, param = parts[3], ".".join(parts[4:-1]), parts[-1]
            base = f"transformer.resblocks.{index}"
            if layer in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                fused.setdefault(f"{base}.attn.in_proj_{param}", {})[layer[-6]] = value
            elif layer in _OPEN_CLIP_LAYER:
                out[f"{base}.{_OPEN_CLIP_LAYER[layer]}.{param}"] = value
            else:
                raise ValueError(f"text encoder 2 weight {key!r} has no place in the OpenCLIP layout")
        else:
            raise ValueError(f"text encoder 2 weight {key!r} has no place in the OpenCLIP layout")
    for name, qkv in fused.items():
        out[name] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
    return out


def ldm_state_dict(unet: Any, vae: Any, text_encoders: list[Any]) -> dict[str, Tensor]:
    """One original-layout state dict from loaded diffusers/transformers modules (1 text encoder: SD1.5, 2: SDXL)."""
    if len(text_encoders) not in (1, 2):
        raise ValueError(f"expected 1 (SD1.5) or 2 (SDXL) text encoders, got {len(text_encoders)}")
    out = {UNET_PREFIX + k: v for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()}
    out.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()})
    if len(text_encoders) == 1:
        out.update({SD15_CLIP_PREFIX + k: v for k, v in clip_to_ldm(text_encoders[0].state_dict()).items()})
    else:
        out.update({SDXL_CLIP_PREFIX + k: v for k, v in clip_to_ldm(text_encoders[0].state_dict()).items()})
        out.update({SDXL_OPEN_CLIP_PREFIX + k: v for k, v in open_clip_to_ldm(text_encoders[1].state_dict()).items()})
    return out


def save_single_file(pipeline_folder: str | Path, out_path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write a diffusers SD1.5/SDXL pipeline folder as one A1111/ComfyUI-style `.safetensors` (LDM key names)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from ..atomic import save_safetensors

    folder, out_path = Path(pipeline_folder), Path(out_path)
    if not (folder / "model_index.json").exists():
        raise ValueError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    if out_path.suffix != ".safetensors":
        raise ValueError(f"{out_path}: the single file must end in .safetensors")
    index = json.loads((folder / "model_index.json").read_text())
    encoders = [CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")]
    if "text_encoder_2" in index:
        encoders.append(CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2"))
    state = ldm_state_dict(UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
                           AutoencoderKL.from_pretrained(folder, subfolder="vae"), encoders)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(out_path, state, metadata={"format": "pt", "source": "prefalign save_single_file"})
    return out_path
