"""The SD3/Flux LoRA file: diffusers' `load_lora_weights` reproduces the trained transformer, and stock ComfyUI
(when COMFYUI_DIR / COMFYUI_PYTHON are set) maps every key and patches the same weights diffusers merges."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_pairs, tiny_config
from test_flow import spy_forward
from trainer.loop import train
from trainer.models.lora import DEFAULT_TARGETS
from trainer.models.tiny import tiny_model_path
from trainer.run import make_backend

MODELS = ("tiny-sd3", "tiny-flux")


def trained(tmp_path, model):
    config = tiny_config(tmp_path, model=model, max_steps=3, learning_rate=1e-2, alpha=2.0)
    backend = make_backend(config, torch.device("cpu"))
    result = train(config, backend, make_pairs(4))
    return backend, result.lora_path


def transformer_call(backend) -> dict:
    """The keyword arguments the backend gives its transformer for one fixed input."""
    forward = backend._forward
    seen = spy_forward(backend)
    cond = backend.encode_prompts(["a red square"])
    with torch.no_grad():
        backend.predict(torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([400]), cond)
    backend._forward = forward
    return seen


@pytest.mark.parametrize("model", MODELS)
def test_exported_lora_reproduces_trained_transformer_in_diffusers(tmp_path, model):
    from diffusers import DiffusionPipeline

    backend, lora_path = trained(tmp_path, model)
    kwargs = transformer_call(backend)
    with torch.no_grad():
        ours = backend.model(**kwargs)[0]
        with backend.reference():
            base = backend.model(**kwargs)[0]
    assert (ours - base).abs().max() > 1e-4  # training changed the model
    pipe = DiffusionPipeline.from_pretrained(str(tiny_model_path(model)))
    pipe.load_lora_weights(str(lora_path))
    with torch.no_grad():
        loaded = pipe.transformer(**kwargs)[0]
    torch.testing.assert_close(loaded, ours, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model", MODELS)
def test_exported_keys_are_diffusers_names_of_every_default_target(tmp_path, model):
    backend = make_backend(tiny_config(tmp_path, model=model, rank=4, alpha=8.0), torch.device("cpu"))
    keys = backend.export_lora()
    suffixes = DEFAULT_TARGETS[backend.parts.architecture]
    linear = {n for n, m in backend.model.named_modules() if n.endswith(suffixes) and hasattr(m, "base_layer")}
    assert {k.rsplit(".lora_", 1)[0] for k in keys} == {f"transformer.{n}" for n in linear}
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    names = set(linear)
    if model == "tiny-flux":  # single blocks: attention q/k/v, MLP in, fused out
        assert {"single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp",
                "single_transformer_blocks.0.proj_out"} <= names
    else:  # SD3.5's second attention in MMDiT-X blocks, and both streams' MLPs
        assert {"transformer_blocks.0.attn2.to_q", "transformer_blocks.0.ff_context.net.2",
                "transformer_blocks.0.attn.add_k_proj"} <= names


def test_alpha_over_rank_is_folded_into_lora_b(tmp_path):
    backend = make_backend(tiny_config(tmp_path, model="tiny-flux", rank=4, alpha=8.0), torch.device("cpu"))
    params = dict(backend.model.named_parameters())
    name = "transformer_blocks.0.attn.to_q"
    with torch.no_grad():
        params[f"{name}.lora_B.default.weight"].fill_(0.5)
    keys = backend.export_lora()
    assert torch.all(keys[f"transformer.{name}.lora_B.weight"] == 1.0)  # 0.5 * 8 / 4
    torch.testing.assert_close(keys[f"transformer.{name}.lora_A.weight"], params[f"{name}.lora_A.default.weight"])


COMFYUI_DIR, COMFYUI_PYTHON = os.environ.get("COMFYUI_DIR"), os.environ.get("COMFYUI_PYTHON")


@pytest.mark.skipif(not (COMFYUI_DIR and COMFYUI_PYTHON),
                    reason="set COMFYUI_DIR and COMFYUI_PYTHON to apply the LoRA with stock ComfyUI")
@pytest.mark.parametrize("model", MODELS)
def test_stock_comfyui_loads_every_key_and_patches_what_diffusers_merges(tmp_path, model):
    from diffusers import DiffusionPipeline

    _, lora_path = trained(tmp_path, model)
    pipe = DiffusionPipeline.from_pretrained(str(tiny_model_path(model)))
    base = {k: v.detach().clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(str(lora_path))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    merged = {k: v.detach().clone() for k, v in pipe.transformer.state_dict().items()}
    assert set(merged) == set(base) and any(not torch.equal(merged[k], base[k]) for k in base)
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(merged, str(tmp_path / "merged.safetensors"))
    probe = Path(__file__).parent / "comfyui" / "flow_lora_probe.py"
    out = tmp_path / "probe.json"
    family = {"tiny-sd3": "sd3", "tiny-flux": "flux"}[model]
    done = subprocess.run([COMFYUI_PYTHON, str(probe), COMFYUI_DIR, family, str(tmp_path / "base.safetensors"),
                           str(tmp_path / "merged.safetensors"), str(lora_path), str(out)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["unloaded"] == [] and report["missing"] == []
    lora_modules = {k.rsplit(".lora_", 1)[0] for k in load_file(str(lora_path))}
    assert len(report["patched"]) > 0 and report["compared"] > 0 and len(lora_modules) > len(report["patched"]) / 2
    assert report["max_diff"] < 1e-5
