"""Apply a PrefAlign SD3/Flux LoRA with stock ComfyUI and report how it landed (run with ComfyUI's Python).

`python flow_lora_probe.py COMFYUI_DIR sd3|flux BASE.safetensors MERGED.safetensors LORA.safetensors OUT.json`

BASE and MERGED are diffusers-format transformer state dicts: the base weights, and the same with the LoRA
merged by diffusers (`load_lora_weights` + `fuse_lora`). The LoRA goes through ComfyUI's own key map and
`comfy.lora.load_lora` (what LoraLoader runs) and its patch arithmetic, and the patched weights are compared
with MERGED converted to ComfyUI's layout by its own diffusers converter (`convert_diffusers_mmdit`).

- sd3: ComfyUI loads BASE as its model (UNETLoader's `comfy.sd.load_diffusion_model_state_dict`), takes the
  key map from `comfy.lora.model_lora_keys_unet` and patches through its ModelPatcher.
- flux: ComfyUI's Flux detection fixes the real widths (hidden 3072, 24 heads), so a tiny Flux cannot be
  instantiated; the key map is built as `model_lora_keys_unet`'s Flux branch builds it (from
  `comfy.utils.flux_to_diffusers`) and the patches are applied as ModelPatcher applies them
  (`comfy.lora.calculate_weight` with the fused-qkv/linear1 offsets).

OUT gets the LoRA keys ComfyUI did not load ("lora key not loaded"), the patched weights and the largest
difference from diffusers' merge.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from comfy_server import caught_logs  # this folder is sys.path[0] of a script run


def patched_by_model(comfy, base_sd, lora_sd):
    patcher = comfy.sd.load_diffusion_model_state_dict(base_sd)
    patches = comfy.lora.load_lora(lora_sd, comfy.lora.model_lora_keys_unet(patcher.model, {}))
    patcher.add_patches(patches, 1.0)
    patcher.patch_model()
    return patches, patcher.model.diffusion_model.state_dict()


def patched_by_key_map(comfy, base_sd, lora_sd):
    ids = lambda prefix: {k.split(".")[1] for k in base_sd if k.startswith(prefix)}  # noqa: E731
    config = {"depth": len(ids("transformer_blocks.")), "depth_single_blocks": len(ids("single_transformer_blocks.")),
              "hidden_size": base_sd["x_embedder.weight"].shape[0]}
    key_map = {f"transformer.{k[:-len('.weight')]}": to
               for k, to in comfy.utils.flux_to_diffusers(config, output_prefix="").items() if k.endswith(".weight")}
    patches = comfy.lora.load_lora(lora_sd, key_map)
    grouped: dict[str, list] = {}
    for k, patch in patches.items():
        key, offset = (k, None) if isinstance(k, str) else (k[0], k[1])
        grouped.setdefault(key, []).append((1.0, patch, 1.0, offset, None))
    state = comfy.model_detection.convert_diffusers_mmdit(base_sd, "")
    return patches, {k: comfy.lora.calculate_weight(grouped[k], w.clone(), k) if k in grouped else w
                     for k, w in state.items()}


def main(comfy_dir: str, family: str, base: str, merged: str, lora: str, out: str) -> None:
    sys.path.insert(0, comfy_dir)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.lora
    import comfy.model_detection
    import comfy.sd
    import comfy.utils

    with caught_logs() as unloaded:
        base_sd, lora_sd = comfy.utils.load_torch_file(base), comfy.utils.load_torch_file(lora)
        patch = patched_by_model if family == "sd3" else patched_by_key_map
        patches, state = patch(comfy, base_sd, lora_sd)
        expected = comfy.model_detection.convert_diffusers_mmdit(comfy.utils.load_torch_file(merged), "")
    diffs = {k: (state[k].float() - v.float()).abs().max().item() for k, v in expected.items() if k in state}
    Path(out).write_text(json.dumps({
        "unloaded": [m for m in unloaded if "not loaded" in m],
        "patched": sorted({str(k if isinstance(k, str) else k[0]) for k in patches}),
        "max_diff": max(diffs.values()),
        "compared": len(diffs),
        "missing": sorted(set(expected) - set(state))[:5],
    }))


if __name__ == "__main__":
    main(*sys.argv[1:7])
