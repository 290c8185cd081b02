"""The exported LoRA file loads in diffusers (and ComfyUI's key map) and reproduces the trained UNet."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_pairs, tiny_config
from trainer.loop import train
from trainer.models.tiny import tiny_model_path
from trainer.run import make_backend


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl"])
def test_exported_lora_reproduces_trained_unet_in_diffusers(tmp_path, model):
    from diffusers import DiffusionPipeline

    config = tiny_config(tmp_path, model=model, max_steps=3, learning_rate=1e-2, alpha=2.0)
    backend = make_backend(config, torch.device("cpu"))
    result = train(config, backend, make_pairs(4))
    cond = backend.encode_prompts(["a red square"])
    cond["time_ids"] = torch.tensor([[32.0, 32, 0, 0, 32, 32]])
    x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([400])
    with torch.no_grad():
        trained = backend.predict(x, t, cond)
        with backend.reference():
            base = backend.predict(x, t, cond)
    assert (trained - base).abs().max() > 1e-4  # training changed the model

    pipe = DiffusionPipeline.from_pretrained(str(tiny_model_path(model)))
    pipe.load_lora_weights(str(result.lora_path))
    kwargs = {"encoder_hidden_states": cond["prompt_embeds"]}
    if model == "tiny-sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
    with torch.no_grad():
        loaded = pipe.unet(x, t, **kwargs).sample
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-4)


def diffusers_module_names(model: str) -> set[str]:
    """kohya names of every attention projection in the diffusers UNet (what ComfyUI maps)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_model_path(model)), subfolder="unet")
    suffixes = ("to_q", "to_k", "to_v", "to_out.0")
    return {"lora_unet_" + n.replace(".", "_") for n, _ in unet.named_modules() if n.endswith(suffixes)}


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl"])
def test_exported_keys_are_kohya_names_of_every_target(tmp_path, model):
    backend = make_backend(tiny_config(tmp_path, model=model), torch.device("cpu"))
    keys = backend.export_lora()
    modules = {k.split(".")[0] for k in keys}
    assert modules == diffusers_module_names(model)
    for m in modules:
        assert {f"{m}.lora_down.weight", f"{m}.lora_up.weight", f"{m}.alpha"} <= set(keys)
        assert keys[f"{m}.alpha"].item() == 4.0


COMFYUI_DIR = os.environ.get("COMFYUI_DIR")


@pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to check its LoRA key map")
@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl"])
def test_comfyui_maps_every_exported_key(tmp_path, model):
    """ComfyUI's own key map (comfy.lora.model_lora_keys_unet) knows every module we write."""
    sys.path.insert(0, str(Path(COMFYUI_DIR)))
    import comfy.utils

    backend = make_backend(tiny_config(tmp_path, model=model), torch.device("cpu"))
    modules = {k.split(".")[0] for k in backend.export_lora()}
    names = comfy.utils.unet_to_diffusers(comfy_unet_config(backend.model.config))
    mapped = {"lora_unet_" + k[: -len(".weight")].replace(".", "_") for k in names if k.endswith(".weight")}
    assert modules <= mapped, sorted(modules - mapped)[:5]


def comfy_unet_config(config) -> dict:
    """ComfyUI's description of a diffusers UNet layout (what its checkpoint detection derives)."""
    levels = len(config.block_out_channels)
    layers = config.transformer_layers_per_block
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers] * levels
    depth = [layers[i] if "CrossAttn" in config.down_block_types[i] else 0 for i in range(levels)]
    return {
        "num_res_blocks": [config.layers_per_block] * levels,
        "channel_mult": [c // config.block_out_channels[0] for c in config.block_out_channels],
        "transformer_depth": [d for d in depth for _ in range(config.layers_per_block)],
        "transformer_depth_output": [d for d in depth for _ in range(config.layers_per_block + 1)],
        "transformer_depth_middle": layers[-1],
    }


def test_metadata_names_a_v_prediction_base(tmp_path):
    """A LoRA trained on a v-prediction base says so: ours, and kohya's ss_v_parameterization that A1111/Forge read."""
    from trainer.export import lora_metadata

    info = {"name": "x", "hash": "h", "architecture": "sdxl", "prediction_type": "v_prediction"}
    meta = lora_metadata(tiny_config(tmp_path), info, 3, {"loss": 0.5})
    assert meta["prefalign.prediction_type"] == "v_prediction" and meta["ss_v_parameterization"] == "True"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
