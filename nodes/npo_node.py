"""Apply a LoRA to the negative (unconditional) branch of classifier-free guidance only: Diffusion-NPO sampling.

Diffusion-NPO (Wang et al., ICLR 2025; G-U-N/Diffusion-NPO `pipeline_stable_diffusion_double_unet.py`)
predicts the negative branch with the model + the NPO LoRA and the positive branch with the model:

    eps = eps_{model+npo}(x, negative) + cfg * (eps_model(x, positive) - eps_{model+npo}(x, negative))

Over the graph's MODEL: the LoRA's weights become weight wrappers that add the LoRA only while the
negative branch runs (ComfyUI computes the patched weight with its own `comfy.lora.calculate_weight`, so
any LoRA format ComfyUI loads works), and a model function wrapper runs each sampling call's negative
rows with the wrappers on and its positive rows with them off. At cfg 1 ComfyUI skips the negative
branch, so the LoRA has no effect; at strength 0 the node returns the model unchanged.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .lora_nodes import TEXT_ENCODER_PREFIXES, check_fits, lora_file, lora_file_names

CATEGORY = "preference/lora"
UNCOND = 1  # comfy.samplers.calc_cond_batch: index 0 is the positive cond, 1 the negative


class BranchSwitch:
    """Which branch the model is running now; the weight wrappers read it."""

    def __init__(self) -> None:
        self.negative = False


class NegativeBranchWeight:
    """Weight wrapper: the weight with the LoRA patch while the negative branch runs, else unchanged."""

    def __init__(self, key: str, patches: list[tuple], switch: BranchSwitch) -> None:
        self.key, self.patches, self.switch = key, patches, switch

    def __call__(self, weight: Tensor) -> Tensor:
        if not self.switch.negative:
            return weight
        import comfy.lora

        return comfy.lora.calculate_weight(self.patches, weight, self.key)  # weight is ComfyUI's copy


class NegativeBranchWrapper:
    """ComfyUI `model_function_wrapper`: runs the negative chunks with the switch on, the others off."""

    def __init__(self, switch: BranchSwitch, previous=None) -> None:
        self.switch, self.previous = switch, previous

    def _run(self, apply_model, args: dict, negative: bool) -> Tensor:
        self.switch.negative = negative
        try:
            if self.previous is not None:
                return self.previous(apply_model, args)
            return apply_model(args["input"], args["timestep"], **args["c"])
        finally:
            self.switch.negative = False

    def __call__(self, apply_model, args: dict) -> Tensor:
        from ..trainer.generate import take_rows

        chunks = list(args["cond_or_uncond"])
        flags = [c == UNCOND for c in chunks]
        if all(flags) or not any(flags):
            return self._run(apply_model, args, all(flags))
        x = args["input"]
        n, per_chunk = x.shape[0], x.shape[0] // len(chunks)
        out = torch.empty_like(x)
        for negative in (True, False):
            picked = [i for i, f in enumerate(flags) if f == negative]
            rows = torch.cat([torch.arange(i * per_chunk, (i + 1) * per_chunk) for i in picked]).to(x.device)
            c = take_rows(args["c"], rows, n)
            options = dict(c.get("transformer_options", {}))
            for key in ("cond_or_uncond", "uuids"):
                if key in options:
                    options[key] = [options[key][i] for i in picked]
            if "transformer_options" in c:
                c["transformer_options"] = options
            sub = {"input": x[rows], "timestep": args["timestep"][rows], "c": c,
                   "cond_or_uncond": [chunks[i] for i in picked]}
            out[rows] = self._run(apply_model, sub, negative).to(out.dtype)
        return out


def negative_branch_lora(model, lora: dict[str, Tensor], strength: float, key_map: dict | None = None):
    """A clone of `model` (a ModelPatcher) whose negative CFG branch runs with `lora` at `strength`. `key_map`:
    ComfyUI's LoRA key map of the model's diffusion model, when the caller has it already."""
    import comfy.lora
    import comfy.lora_convert

    if key_map is None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora), key_map)
    patches: dict[str, list[tuple]] = {}  # ComfyUI's patch tuples by weight key, as ModelPatcher.add_patches builds them
    for k, adapter in loaded.items():
        key, offset, function = (k, None, None) if isinstance(k, str) else (k[0], k[1], k[2] if len(k) > 2 else None)
        patches.setdefault(key, []).append((strength, adapter, 1.0, offset, function))
    if not patches:
        raise ValueError("the LoRA has no weights for this model's diffusion model (wrong base model or format?)")
    patched = model.clone()
    switch = BranchSwitch()
    for key, key_patches in patches.items():
        patched.add_weight_wrapper(key, NegativeBranchWeight(key, key_patches, switch))
    previous = patched.model_options.get("model_function_wrapper")
    patched.set_model_unet_function_wrapper(NegativeBranchWrapper(switch, previous))
    return patched


class NegativeBranchLoRA:
    DESCRIPTION = ("Diffusion-NPO: apply a LoRA to the negative (unconditional) branch of classifier-free guidance only, "
                   "so guidance steers away from what the LoRA learned. Use a LoRA trained with method npo "
                   "(preference data with chosen and rejected swapped). Needs cfg > 1; strength 0 leaves the model as it was.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "info")
    OUTPUT_TOOLTIPS = ("The model whose negative branch runs with the LoRA.", "The LoRA's metadata as text.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to sample with (a positive preference LoRA may already be on it)."}),
                "lora_name": (lora_file_names(), {"tooltip": "A negative-preference .safetensors LoRA in models/loras (PrefAlign method npo)."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                       "tooltip": "How strongly the LoRA changes the negative branch; 0 = plain sampling."}),
            },
        }

    def apply(self, model, lora_name, strength):
        path, metadata, info = lora_file(lora_name, "Negative-Branch Preference LoRA")
        import comfy.lora
        import comfy.utils

        info += "\napplied to: the negative (unconditional) branch of guidance only"
        if strength == 0:
            return {"ui": {"prefalign_text": [info]}, "result": (model, info)}
        lora = comfy.utils.load_torch_file(str(path), safe_load=True)
        lora = {k: v for k, v in lora.items() if not k.startswith(TEXT_ENCODER_PREFIXES)}  # the UNet's branch only
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        info += check_fits(lora_name, lora, key_map, model.model.state_dict(), metadata)
        return {"ui": {"prefalign_text": [info]}, "result": (negative_branch_lora(model, lora, strength, key_map), info)}


NODES = {"PrefAlignNegativeBranchLoRA": (NegativeBranchLoRA, "Negative-Branch Preference LoRA (NPO)")}
