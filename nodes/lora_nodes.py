"""Load a trained preference LoRA: apply it to MODEL (and CLIP when it has text-encoder weights), show its metadata."""
from __future__ import annotations

import json
from pathlib import Path

from . import comfy_env

CATEGORY = "preference/lora"

#: metadata keys shown first, by what they mean (the first present wins)
SUMMARY_KEYS = {
    "method": ("prefalign.method", "ss_prefalign_method", "method"),
    "steps": ("prefalign.steps", "ss_steps", "ss_max_train_steps", "steps"),
    "dataset": ("prefalign.dataset", "ss_dataset", "ss_dataset_dirs", "dataset"),
    "base model": ("prefalign.base_model", "ss_sd_model_name", "modelspec.architecture"),
    "rank / alpha": ("ss_network_dim",),
}


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def summarize(metadata: dict[str, str]) -> dict[str, str]:
    out = {}
    for label, keys in SUMMARY_KEYS.items():
        for key in keys:
            if metadata.get(key):
                value = metadata[key]
                if label == "rank / alpha" and metadata.get("ss_network_alpha"):
                    value = f"{value} / {metadata['ss_network_alpha']}"
                out[label] = value
                break
    return out


def describe(name: str, metadata: dict[str, str]) -> str:
    lines = [name]
    summary = summarize(metadata)
    lines += [f"{k}: {v}" for k, v in summary.items()]
    args = metadata.get("prefalign.method_args")
    if args:
        try:
            lines.append("hyper-parameters: " + ", ".join(f"{k}={v}" for k, v in json.loads(args).items()))
        except (ValueError, AttributeError):
            lines.append(f"hyper-parameters: {args}")
    if not summary:
        lines.append("(no PrefAlign metadata)")
    return "\n".join(lines)


class LoadPreferenceLoRA:
    DESCRIPTION = ("Apply a trained preference LoRA to MODEL (and CLIP when the file has text-encoder weights) and "
                   "show its metadata: method, steps, dataset. Stock LoraLoader loads the same files.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("model", "clip", "info")
    OUTPUT_TOOLTIPS = ("The model with the LoRA applied.", "The CLIP with the LoRA applied (unchanged if the LoRA has no text-encoder weights).", "The file's metadata as text.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to apply the LoRA to."}),
                "lora_name": (comfy_env.lora_names(), {"tooltip": "A LoRA file in models/loras (PrefAlign saves into models/loras/prefalign/)."}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": "How strongly the LoRA changes the diffusion model; 0 leaves it unchanged, negative inverts the preference."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "Optional CLIP, patched only if the LoRA has text-encoder weights."}),
                "strength_clip": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": "How strongly the LoRA changes CLIP (if it trained CLIP)."}),
            },
        }

    def load(self, model, lora_name, strength_model, clip=None, strength_clip=1.0):
        import comfy.sd
        import comfy.utils

        path = comfy_env.lora_full_path(lora_name)
        metadata = read_metadata(path)
        info = describe(lora_name, metadata)
        if strength_model == 0 and (clip is None or strength_clip == 0):
            return {"ui": {"text": [info]}, "result": (model, clip, info)}
        lora = comfy.utils.load_torch_file(str(path), safe_load=True)
        has_te = any(k.startswith(("lora_te", "text_encoder", "te_")) for k in lora)
        clip_in = clip if (clip is not None and has_te) else None
        new_model, new_clip = comfy.sd.load_lora_for_models(model, clip_in, lora, strength_model, strength_clip if clip_in is not None else 0)
        return {"ui": {"text": [info]}, "result": (new_model, new_clip if clip_in is not None else clip, info)}


NODES = {"PrefAlignLoadLoRA": (LoadPreferenceLoRA, "Load Preference LoRA")}
