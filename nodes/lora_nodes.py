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
MAX_VALUE_CHARS = 200  # a metadata value is shown up to this long: a file may carry megabytes of it
MAX_LISTED = 3  # modules named in a "does not fit" message
#: the down/up weight names of one LoRA module, in the formats ComfyUI's LoRA adapter reads
DOWN_UP = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"),
           (".lora.down.weight", ".lora.up.weight"))
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te_")


def lora_file_names() -> list[str]:
    """The LoRA menu: .safetensors only (a .pt/.ckpt file can hold pickled code, and is never read here)."""
    return [n for n in comfy_env.lora_names() if n.lower().endswith(".safetensors")]


def require_safetensors(lora_name: str, node: str) -> None:
    """Refuse, naming the file and the node, any LoRA that is not .safetensors (nothing is unpickled)."""
    if not lora_name.lower().endswith(".safetensors"):
        raise ValueError(f"{lora_name}: {node} reads .safetensors files only (a .pt/.ckpt file can hold pickled "
                         "code); use a .safetensors copy")


def lora_file(lora_name: str, node: str) -> tuple[Path, dict[str, str], str]:
    """The chosen LoRA's path, metadata and description for the node's info; refused unless .safetensors."""
    require_safetensors(lora_name, node)
    path = comfy_env.lora_full_path(lora_name)
    metadata = read_metadata(path)
    return path, metadata, describe(lora_name, metadata)


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def shown(value: str) -> str:
    """A metadata value as shown on the node: one line, at most MAX_VALUE_CHARS."""
    value = " ".join(str(value).split())
    return value if len(value) <= MAX_VALUE_CHARS else value[:MAX_VALUE_CHARS - 1] + "…"


def summarize(metadata: dict[str, str]) -> dict[str, str]:
    out = {}
    for label, keys in SUMMARY_KEYS.items():
        for key in keys:
            if metadata.get(key):
                value = metadata[key]
                if label == "rank / alpha" and metadata.get("ss_network_alpha"):
                    value = f"{value} / {metadata['ss_network_alpha']}"
                out[label] = shown(value)
                break
    return out


def hyper_parameters(text: str) -> str:
    """`prefalign.method_args` (a flat JSON object) as `k=v, ...`; anything else (nested, huge, broken) as raw text."""
    if len(text) <= MAX_VALUE_CHARS:
        try:
            args = json.loads(text)
        except (ValueError, RecursionError):
            args = None
        if isinstance(args, dict) and all(isinstance(v, (str, int, float, bool)) or v is None for v in args.values()):
            return shown(", ".join(f"{k}={v}" for k, v in args.items()))
    return shown(text)


def describe(name: str, metadata: dict[str, str]) -> str:
    lines = [name]
    summary = summarize(metadata)
    lines += [f"{k}: {v}" for k, v in summary.items()]
    args = metadata.get("prefalign.method_args")
    if args:
        lines.append("hyper-parameters: " + hyper_parameters(args))
    if not summary:
        lines.append("(no PrefAlign metadata)")
    return "\n".join(lines)


def module_features(lora: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of every down/up module of a LoRA state dict, by module name."""
    from ..trainer.export import lora_features

    features = {}
    for key, down in lora.items():
        for down_suffix, up_suffix in DOWN_UP:
            if key.endswith(down_suffix) and key[:-len(down_suffix)] + up_suffix in lora and down.dim() >= 2:
                module = key[:-len(down_suffix)]
                features[module] = lora_features(down, lora[module + up_suffix])
    return features


def check_fits(name: str, lora: dict, key_map: dict, weights: dict, metadata: dict[str, str]) -> str:
    """Refuse a LoRA whose modules do not fit the weights ComfyUI's key map puts them on, naming them (the
    trainer's wrong-base check, `trainer.export.misfits`). Returns the line the node's info adds for the modules the
    map does not place (ComfyUI skips those: "lora key not loaded"), or "" when it places them all."""
    from ..trainer.export import misfits

    have = module_features(lora)
    targets = {m: key_map[m] for m in have if isinstance(key_map.get(m), str) and key_map[m] in weights}
    expected = {m: (weights[k].shape[1], weights[k].shape[0]) for m, k in targets.items() if weights[k].dim() >= 2}
    wrong = misfits(have, expected)
    unplaced = sorted(m for m in have if m not in key_map)
    made_for = metadata.get("prefalign.architecture") or metadata.get("ss_base_model_version")
    hint = f" (its metadata says it was trained for {shown(made_for)})" if made_for else ""
    if wrong:
        raise ValueError(f"{name} does not fit this model{hint}: {len(wrong)} of its {len(have)} modules have other "
                         f"shapes: " + "; ".join(wrong[:MAX_LISTED]) + ("; ..." if len(wrong) > MAX_LISTED else ""))
    if have and len(unplaced) == len(have):
        raise ValueError(f"{name} does not fit this model{hint}: none of its {len(have)} modules exists in it "
                         f"(e.g. {unplaced[0]})")
    return f"\nnot applied: {len(unplaced)} modules this model does not have (e.g. {shown(unplaced[0])})" if unplaced else ""


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
                "lora_name": (lora_file_names(), {"tooltip": "A .safetensors LoRA in models/loras (PrefAlign saves into models/loras/prefalign/)."}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": "How strongly the LoRA changes the diffusion model; 0 leaves it unchanged, negative inverts the preference."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "Optional CLIP, patched only if the LoRA has text-encoder weights."}),
                "strength_clip": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": "How strongly the LoRA changes CLIP (if it trained CLIP)."}),
            },
        }

    def load(self, model, lora_name, strength_model, clip=None, strength_clip=1.0):
        path, metadata, info = lora_file(lora_name, "Load Preference LoRA")
        import comfy.lora
        import comfy.sd
        import comfy.utils

        if strength_model == 0 and (clip is None or strength_clip == 0):
            return {"ui": {"prefalign_text": [info]}, "result": (model, clip, info)}
        lora = comfy.utils.load_torch_file(str(path), safe_load=True)
        has_te = any(k.startswith(TEXT_ENCODER_PREFIXES) for k in lora)
        clip_in = clip if (clip is not None and has_te) else None
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        weights = dict(model.model.state_dict())
        if clip_in is not None:
            key_map = comfy.lora.model_lora_keys_clip(clip_in.cond_stage_model, key_map)
            weights.update(clip_in.cond_stage_model.state_dict())
        applied = {k: v for k, v in lora.items() if clip_in is not None or not k.startswith(TEXT_ENCODER_PREFIXES)}
        info += check_fits(lora_name, applied, key_map, weights, metadata)
        new_model, new_clip = comfy.sd.load_lora_for_models(model, clip_in, lora, strength_model, strength_clip if clip_in is not None else 0)
        return {"ui": {"prefalign_text": [info]}, "result": (new_model, new_clip if clip_in is not None else clip, info)}


NODES = {"PrefAlignLoadLoRA": (LoadPreferenceLoRA, "Load Preference LoRA")}
