"""The Negative-Branch LoRA node (nodes/npo_node.py) with fake ComfyUI objects.

The fakes follow ComfyUI 0.3.64: `comfy.samplers.calc_cond_batch` calls `model_options["model_function_wrapper"]`
with `apply_model` and {"input", "timestep", "c", "cond_or_uncond"} (chunk index 0 = positive, 1 = negative),
weight wrappers get a copy of the weight, and `comfy.lora.calculate_weight` adds strength * alpha/rank * up @ down.
"""
from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from conftest import PACK, fake_comfy

npo_node = sys.modules[f"{PACK}.nodes.npo_node"]


class Patcher(fake_comfy.ModelPatcher):
    """The fake patcher plus ComfyUI's model_options and set_model_unet_function_wrapper."""

    def __init__(self, *args, model_options=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_options = copy.deepcopy(model_options or {"transformer_options": {}})

    def clone(self):
        return Patcher(self.model, self.lora, self.weight_wrapper_patches, self.object_patches,
                       model_options=self.model_options)

    def set_model_unet_function_wrapper(self, wrapper):
        self.model_options["model_function_wrapper"] = wrapper


def install_comfy_lora(monkeypatch):
    """comfy.lora / comfy.lora_convert as the node uses them (kohya keys, ComfyUI's patch tuples)."""
    lora_mod = types.ModuleType("comfy.lora")

    def model_lora_keys_unet(model, key_map):
        for k in model.state_dict():
            if k.startswith("diffusion_model.") and k.endswith(".weight"):
                key_map["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
        return key_map

    def load_lora(lora, key_map):
        return {weight: (lora[f"{name}.lora_up.weight"], lora[f"{name}.lora_down.weight"], float(lora[f"{name}.alpha"]))
                for name, weight in key_map.items() if f"{name}.lora_up.weight" in lora}

    def calculate_weight(patches, weight, key):
        for strength, (up, down, alpha), strength_model, offset, function in patches:
            weight += strength * (alpha / down.shape[0]) * (up @ down).reshape(weight.shape)
        return weight

    lora_mod.model_lora_keys_unet, lora_mod.load_lora, lora_mod.calculate_weight = model_lora_keys_unet, load_lora, calculate_weight
    convert = types.ModuleType("comfy.lora_convert")
    convert.convert_lora = lambda lora: lora
    monkeypatch.setitem(sys.modules, "comfy.lora", lora_mod)
    monkeypatch.setitem(sys.modules, "comfy.lora_convert", convert)
    monkeypatch.setattr(sys.modules["comfy"], "lora", lora_mod, raising=False)
    monkeypatch.setattr(sys.modules["comfy"], "lora_convert", convert, raising=False)


def random_lora(patcher, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name, m in patcher.model.named_modules():
        if name.endswith(("to_q", "to_k", "to_v")):
            key = "lora_unet_" + name[len("diffusion_model."):].replace(".", "_")
            lora[f"{key}.lora_up.weight"] = torch.randn(m.weight.shape[0], 2, generator=g)
            lora[f"{key}.lora_down.weight"] = torch.randn(2, m.weight.shape[1], generator=g)
            lora[f"{key}.alpha"] = torch.tensor(1.0)
    return lora


def batch(seed: int = 0):
    """Two chunks of two rows each, as calc_cond_batch concatenates them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 4, 8, 8, generator=g)
    sigma = torch.full((4,), 2.0)
    context = torch.randn(4, 5, 8, generator=g)
    return x, sigma, context


def run(patcher, x, sigma, context, cond_or_uncond):
    """What calc_cond_batch does with the model function wrapper, on the loaded patcher."""
    patcher.load()
    c = {"c_crossattn": context, "transformer_options": {"cond_or_uncond": list(cond_or_uncond), "uuids": ["u0", "u1"]}}
    wrapper = patcher.model_options.get("model_function_wrapper")
    apply_model = patcher.model.apply_model
    with torch.no_grad():
        if wrapper is None:
            return apply_model(x, sigma, **c)
        return wrapper(apply_model, {"input": x, "timestep": sigma, "c": c, "cond_or_uncond": list(cond_or_uncond)})


def reference(lora, strength, x, sigma, context):
    """The model with the LoRA baked into its weights (separate copy) and without it."""
    plain = Patcher(copy.deepcopy(fake_comfy.make_model_patcher().model))
    baked = Patcher(copy.deepcopy(fake_comfy.make_model_patcher().model))
    fake_comfy.apply_kohya(baked, lora, strength)
    return run(plain, x, sigma, context, [0, 1]), run(baked, x, sigma, context, [0, 1])


@pytest.mark.parametrize("order", [[0, 1], [1, 0]])
def test_negative_rows_get_the_lora_positive_rows_do_not(comfy_folders, monkeypatch, order):
    install_comfy_lora(monkeypatch)
    base = Patcher(fake_comfy.make_model_patcher().model)
    lora = random_lora(base)
    x, sigma, context = batch()
    patched = npo_node.negative_branch_lora(base, lora, 0.7)
    out = run(patched, x, sigma, context, order)
    without, with_lora = reference(lora, 0.7, x, sigma, context)
    for chunk, kind in enumerate(order):
        rows = slice(2 * chunk, 2 * chunk + 2)
        expected = with_lora if kind == npo_node.UNCOND else without
        assert torch.allclose(out[rows], expected[rows], atol=1e-5), (order, chunk)
    assert not torch.allclose(with_lora, without, atol=1e-3)
    # the graph's model is left as it was
    assert "model_function_wrapper" not in base.model_options and not base.weight_wrapper_patches
    assert torch.allclose(run(base, x, sigma, context, order), without, atol=1e-6)


def test_all_negative_and_all_positive_batches(comfy_folders, monkeypatch):
    install_comfy_lora(monkeypatch)
    base = Patcher(fake_comfy.make_model_patcher().model)
    lora = random_lora(base)
    x, sigma, context = batch()
    patched = npo_node.negative_branch_lora(base, lora, 1.0)
    without, with_lora = reference(lora, 1.0, x, sigma, context)
    assert torch.allclose(run(patched, x, sigma, context, [1, 1]), with_lora, atol=1e-5)
    assert torch.allclose(run(patched, x, sigma, context, [0, 0]), without, atol=1e-6)


def test_an_earlier_model_wrapper_still_runs_for_each_branch(comfy_folders, monkeypatch):
    install_comfy_lora(monkeypatch)
    base = Patcher(fake_comfy.make_model_patcher().model)
    seen = []

    def earlier(apply_model, args):
        seen.append((list(args["cond_or_uncond"]), list(args["c"]["transformer_options"]["cond_or_uncond"]),
                     args["input"].shape[0]))
        return apply_model(args["input"], args["timestep"], **args["c"]) * 2.0

    base.set_model_unet_function_wrapper(earlier)
    x, sigma, context = batch()
    lora = random_lora(base)
    out = run(npo_node.negative_branch_lora(base, lora, 1.0), x, sigma, context, [0, 1])
    without, with_lora = reference(lora, 1.0, x, sigma, context)
    assert sorted(seen) == [([0], [0], 2), ([1], [1], 2)]
    assert torch.allclose(out[:2], 2 * without[:2], atol=1e-5) and torch.allclose(out[2:], 2 * with_lora[2:], atol=1e-5)


def test_node_strength_zero_returns_the_model_and_metadata(comfy_folders, monkeypatch):
    install_comfy_lora(monkeypatch)
    base = Patcher(fake_comfy.make_model_patcher().model)
    path = comfy_folders["loras"] / "npo.safetensors"
    save_file(random_lora(base), str(path), metadata={"prefalign.method": "npo", "prefalign.steps": "40"})
    node = npo_node.NegativeBranchLoRA()
    assert "npo.safetensors" in npo_node.NegativeBranchLoRA.INPUT_TYPES()["required"]["lora_name"][0]
    out = node.apply(base, "npo.safetensors", 0.0)
    assert out["result"][0] is base and "method: npo" in out["result"][1] and "negative" in out["result"][1]
    patched = node.apply(base, "npo.safetensors", 1.0)["result"][0]
    assert patched is not base and "model_function_wrapper" in patched.model_options


def test_node_reads_the_model_key_map_once_and_names_modules_it_skips(comfy_folders, monkeypatch):
    """The key map that checks the file's fit also places its weights (ComfyUI's model_lora_keys_unet ran twice);
    a module this model does not have is named on the node, as Load Preference LoRA names it."""
    install_comfy_lora(monkeypatch)
    lora_mod, maps = sys.modules["comfy.lora"], []
    keys = lora_mod.model_lora_keys_unet
    monkeypatch.setattr(lora_mod, "model_lora_keys_unet", lambda model, key_map: maps.append(1) or keys(model, key_map))
    base = Patcher(fake_comfy.make_model_patcher().model)
    lora = random_lora(base)
    lora["lora_unet_elsewhere.lora_up.weight"], lora["lora_unet_elsewhere.lora_down.weight"] = torch.ones(4, 2), torch.ones(2, 4)
    save_file(lora, str(comfy_folders["loras"] / "npo.safetensors"))
    patched, info = npo_node.NegativeBranchLoRA().apply(base, "npo.safetensors", 1.0)["result"]
    assert len(maps) == 1 and "model_function_wrapper" in patched.model_options
    assert info.endswith("\nnot applied: 1 modules this model does not have (e.g. lora_unet_elsewhere)")


def test_lora_for_another_model_is_refused(comfy_folders, monkeypatch):
    install_comfy_lora(monkeypatch)
    base = Patcher(fake_comfy.make_model_patcher().model)
    with pytest.raises(ValueError, match="no weights for this model"):
        npo_node.negative_branch_lora(base, {"lora_unet_elsewhere.lora_up.weight": torch.zeros(2, 2)}, 1.0)


def test_registered():
    mappings = sys.modules[PACK].NODE_CLASS_MAPPINGS
    assert mappings["PrefAlignNegativeBranchLoRA"] is npo_node.NegativeBranchLoRA
    assert npo_node.NegativeBranchLoRA.CATEGORY.startswith("preference/")


def test_train_node_returns_an_npo_lora_on_the_negative_branch(pack, comfy_folders, monkeypatch):
    from test_nodes_train import store_pairs, train_args

    install_comfy_lora(monkeypatch)
    base = Patcher(fake_comfy.make_model_patcher().model)
    out = pack.NODE_CLASS_MAPPINGS["PrefAlignTrainLoRA"]().train(
        base, fake_comfy.CLIP(), fake_comfy.VAE(), store_pairs(pack), **train_args(method="npo", method_args=""))
    model_out, lora, _, name = out["result"]
    assert name.startswith("prefalign/my_lora_npo_")
    assert isinstance(model_out.model_options["model_function_wrapper"], npo_node.NegativeBranchWrapper)
    assert not model_out.lora  # not applied to the whole model
    x, sigma, context = batch()
    without, with_lora = reference(lora, 1.0, x, sigma, context)
    out = run(model_out, x, sigma, context, [0, 1])
    assert torch.allclose(out[:2], without[:2], atol=1e-5) and torch.allclose(out[2:], with_lora[2:], atol=1e-5)


def test_node_refuses_pickle_files_and_loras_for_another_model(comfy_folders, monkeypatch):
    install_comfy_lora(monkeypatch)
    base = Patcher(fake_comfy.make_model_patcher().model)
    node = npo_node.NegativeBranchLoRA()
    with pytest.raises(ValueError, match=r"old.pt: Negative-Branch Preference LoRA reads .safetensors files only"):
        node.apply(base, "old.pt", 1.0)
    wrong = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) if "lora_up" in k else v for k, v in random_lora(base).items()}
    save_file(wrong, str(comfy_folders["loras"] / "other.safetensors"))
    with pytest.raises(ValueError, match="other.safetensors does not fit this model"):
        node.apply(base, "other.safetensors", 1.0)
