"""The Negative-Branch LoRA node (Diffusion-NPO sampling) in a real ComfyUI on CPU (skipped unless COMFYUI_DIR is set).

    COMFYUI_DIR=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/comfy-venv/bin/python pytest tests/comfyui/test_npo_comfyui.py

On the tiny SD1.5-family checkpoint, with a random kohya LoRA written for its UNet: at strength 0, and at cfg 1
(ComfyUI then skips the negative branch), the image is the plain one; at cfg 7 it equals what ComfyUI's own hook
mechanism gives for a LoRA hooked to the negative conditioning only (Create Hook LoRA + Cond Set Props), and
differs from both the plain image and the LoRA applied to the whole model.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run the integration tests")

CKPT = "tiny_sd15.safetensors"
LORA = "npo_probe.safetensors"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from comfy_server import ComfyServer  # tests/comfyui is on the path of its own tests

    s = ComfyServer.from_env(tmp_path_factory.mktemp("comfy_npo"))
    write_probe_lora(s.base / "models" / "checkpoints" / CKPT, s.base / "models" / "loras" / LORA)
    s.start()
    yield s
    s.stop()


def write_probe_lora(checkpoint: Path, out: Path) -> None:
    """Rank-4 kohya LoRA with random up and down weights on every attention projection of the checkpoint's UNet."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    lora = {}
    with safe_open(str(checkpoint), framework="pt") as f:
        for key in f.keys():
            if key.startswith("model.diffusion_model.") and key.endswith(("to_q.weight", "to_k.weight", "to_v.weight")):
                out_dim, in_dim = f.get_slice(key).get_shape()
                name = "lora_unet_" + key[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
                lora[f"{name}.lora_up.weight"] = 0.05 * torch.randn(out_dim, 4, generator=g)
                lora[f"{name}.lora_down.weight"] = 0.05 * torch.randn(4, in_dim, generator=g)
                lora[f"{name}.alpha"] = torch.tensor(4.0)
    assert lora, "no attention projections found in the checkpoint"
    save_file(lora, str(out), metadata={"prefalign.method": "npo"})


def image(server, graph: dict, node: str) -> np.ndarray:
    return server.image(server.run(graph), node)


def txt2img(model: list, negative: list, cfg: float, prefix: str, seed: int = 11) -> dict:
    return {
        "p": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ck", 1], "text": "a red fox in the snow"}},
        "e": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "k": {"class_type": "KSampler", "inputs": {"model": model, "positive": ["p", 0], "negative": negative,
                                                   "latent_image": ["e", 0], "seed": seed, "steps": 3, "cfg": cfg,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "d": {"class_type": "VAEDecode", "inputs": {"samples": ["k", 0], "vae": ["ck", 2]}},
        "s": {"class_type": "SaveImage", "inputs": {"images": ["d", 0], "filename_prefix": prefix}},
    }


def graph(kind: str, cfg: float, strength: float = 1.0) -> dict:
    """plain | node (our node on MODEL) | whole (stock LoraLoader) | hook (LoRA hooked to the negative cond)."""
    g = {"ck": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
         "n": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ck", 1], "text": ""}}}
    model, negative = ["ck", 0], ["n", 0]
    if kind == "node":
        g["npo"] = {"class_type": "PrefAlignNegativeBranchLoRA",
                    "inputs": {"model": model, "lora_name": LORA, "strength": strength}}
        model = ["npo", 0]
    elif kind == "whole":
        g["l"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model, "lora_name": LORA,
                                                                  "strength_model": strength}}
        model = ["l", 0]
    elif kind == "hook":
        g["h"] = {"class_type": "CreateHookLora", "inputs": {"lora_name": LORA, "strength_model": strength,
                                                             "strength_clip": 0.0}}
        g["hc"] = {"class_type": "ConditioningSetProperties", "inputs": {
            "cond_NEW": negative, "strength": 1.0, "set_cond_area": "default", "hooks": ["h", 0]}}
        negative = ["hc", 0]
    g.update(txt2img(model, negative, cfg, f"npo_{kind}_{cfg}_{strength}"))
    return g


def test_node_is_listed(server):
    info = server.get("/object_info/PrefAlignNegativeBranchLoRA")["PrefAlignNegativeBranchLoRA"]
    assert LORA in info["input"]["required"]["lora_name"][0]
    assert info["category"].startswith("preference/")


def test_negative_branch_lora_in_a_real_comfyui(server):
    plain = image(server, graph("plain", 7.0), "s")
    assert np.array_equal(image(server, graph("node", 7.0, strength=0.0), "s"), plain)
    # cfg 1: ComfyUI runs no negative branch, so the LoRA there changes nothing
    assert np.array_equal(image(server, graph("node", 1.0), "s"), image(server, graph("plain", 1.0), "s"))
    ours = image(server, graph("node", 7.0), "s")
    hooked = image(server, graph("hook", 7.0), "s")
    whole = image(server, graph("whole", 7.0), "s")
    assert np.abs(ours - plain).max() > 10 and np.abs(ours - whole).max() > 10
    assert np.abs(ours - hooked).max() <= 2, np.abs(ours - hooked).max()  # ComfyUI's own negative-only LoRA
