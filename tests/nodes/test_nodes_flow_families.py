"""The Train node on the diffusion transformers ComfyUI runs (fakes of each family: tests/nodes/fake_families.py;
ComfyUI's real classes: tests/comfyui/family_probe.py and test_comfyui_flow.py)."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

import prefalign_pack

fake = sys.modules["prefalign_fake_comfy"]
import prefalign_pack.nodes.comfy_backend as cb  # noqa: E402
import prefalign_pack.nodes.comfy_checkpointing as ckp  # noqa: E402
from prefalign_pack.nodes.comfy_families import FAMILIES as PRESETS, family_of  # noqa: E402
from prefalign_pack.trainer.encoding import concat_rows  # noqa: E402
from prefalign_pack.trainer.models.lora import LoraSpec  # noqa: E402

ff = sys.modules["prefalign_fake_families"]  # loaded by conftest.py

FLOW = ["sd3", "flux", "flux-schnell", "chroma", "qwen_image", "hidream", "lumina2", "wan"]
ARCH = {"flux-schnell": "flux"}
LONG = " ".join(f"word{i}" for i in range(300))  # longer than one CLIP chunk, Flux's 256 T5 tokens and an LLM's prompt


def backend(name: str, targets=None, **kw):
    patcher, clip, vae = ff.make(name)
    spec = LoraSpec(2, 2.0, tuple(targets) if targets else family_of(patcher.model).targets)
    return patcher, cb.ComfyBackend(patcher, clip, vae, spec, **kw)


@pytest.fixture
def converters(comfy_folders):
    """ComfyUI's diffusers converters for the fakes' SD3 and Flux layouts (the real ones: family_probe.py)."""
    utils = sys.modules["comfy.utils"]
    utils.mmdit_to_diffusers, utils.flux_to_diffusers = ff.converter("sd3"), ff.converter("flux")
    return utils


@pytest.mark.parametrize("name", FLOW)
def test_family_preset_targets_and_settings(pack, name):
    """Each family is found from ComfyUI's config class (FluxSchnell and WAN22_T2V by their base class), its preset
    finds the attention and MLP linears of its blocks (not the modulation layers), and it trains with its own
    timestep sampling and guidance."""
    with torch.inference_mode(False):
        _, b = backend(name)
    assert b.model_info()["architecture"] == ARCH.get(name, name) and b.prediction_type == "flow"
    assert len(b.adapters) == ff.PRESET_LAYERS[name]
    assert not any(n.endswith(("mod.lin", "mod.1", "modulation.lin", "adaLN_modulation.1")) for n in b.adapters)
    assert b.timestep_sampling.scheme == ("logit_normal" if name == "sd3" else "uniform")
    assert b.guidance == {"flux": 3.5, "flux-schnell": 3.5, "chroma": 0.0}.get(name)
    assert b.frames == (name in ("qwen_image", "wan"))


@pytest.mark.parametrize("name", FLOW)
def test_conditioning_at_the_encoders_full_length(pack, name):
    """A long prompt keeps every token the family's encoder gives (no cut to 77), a short one its own length (Flux's
    T5 its 256 minimum); rows of different lengths reach the model in separate calls, each at its own length, with
    the pooled vector, guidance, Llama states or attention mask its family's `extra_conds` takes."""
    with torch.inference_mode(False):
        patcher, b = backend(name)
        cond = b.encode_prompts(["a fox", LONG])
        kind = ff.FAMILIES[name]["tokens"]
        lengths = [ff.clip_tokens("a fox", kind), ff.clip_tokens(LONG, kind)]
        assert cond["size.prompt_embeds"][:, 0].tolist() == lengths and cond["prompt_embeds"].shape[1] == max(lengths)
        assert max(lengths) > 77
        x = torch.randn(2, 16, 4, 4)
        received = patcher.model.received
        b.predict(x, torch.tensor([100, 900]), cond)
    calls = {r["context"][1]: r for r in received}
    assert sorted(calls) == sorted(set(lengths))  # Wan's umT5 pads both prompts to its 512 minimum: one call
    assert all(r["x"][0] == (2 if len(set(lengths)) == 1 else 1) for r in received)
    for r in received:
        assert r["context"] == (r["x"][0], r["context"][1], ff.CTX)
        assert (r["y"] is not None) == bool(ff.FAMILIES[name].get("pooled"))
        assert r["guidance"] == ([b.guidance] if b.guidance is not None else None)
        assert r["x"][1:] == ((16, 1, 4, 4) if b.frames else (16, 4, 4))
    if name == "hidream":
        assert calls[lengths[1]]["llama"] == (1, 2, 301, ff.CTX)
    if name == "lumina2":
        assert calls[lengths[1]]["mask"] == (1, 301) and calls[lengths[1]]["num_tokens"] == 301


def test_rows_of_equal_length_share_one_call_in_batch_order(pack):
    with torch.inference_mode(False):
        patcher, b = backend("qwen_image")
        cond = b.encode_prompts(["a b", "one two three four", "c d"])
        x = torch.randn(3, 16, 4, 4)
        together = b.predict(x, torch.tensor([5, 500, 900]), cond)
        alone = [b.predict(x[i:i + 1], torch.tensor([[5, 500, 900][i]]),
                           {k: v[i:i + 1, :int(cond["size." + k][i, 0])] if k in ("prompt_embeds",) else v[i:i + 1]
                            for k, v in cond.items()}) for i in range(3)]
    assert [r["x"][0] for r in patcher.model.received[:2]] == [2, 1]  # rows 0 and 2 in one call, row 1 alone
    assert torch.allclose(together, torch.cat(alone), atol=1e-5)


@pytest.mark.parametrize("name", FLOW)
def test_forward_process_follows_comfyuis_flow_scaling(pack, name):
    """x_t is ComfyUI's CONST noise scaling (1 - sigma) x0 + sigma noise on the model's own shifted sigma table
    (ModelSamplingFlux: 10000 entries), and an oracle that returns the true x0 predicts exactly the target noise - x0."""
    with torch.inference_mode(False):
        patcher, b = backend(name)
        table = patcher.model.model_sampling.sigmas
        assert b.num_train_timesteps == table.shape[0]
        g = torch.Generator().manual_seed(0)
        x0, noise = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
        t = torch.tensor([b.num_train_timesteps // 10, b.num_train_timesteps - 1])
        sigma = table[t].view(-1, 1, 1, 1)
        xt = b.add_noise(x0, noise, t)
        assert torch.allclose(xt, (1 - sigma) * x0 + sigma * noise)
        assert torch.allclose(b.target(x0, noise, t), noise - x0)
        patcher.model.apply_model = lambda x, s, **kw: x0.view(x.shape)  # one prompt: both rows in one call
        cond = b.encode_prompts(["same prompt", "same prompt"])
        assert torch.allclose(b.predict(xt, t, cond), noise - x0, atol=1e-4)


def pairs_of(pack, store: str):
    """Three pairs whose prompts have different lengths (so cached rows are padded and cut back)."""
    images = lambda v: torch.stack([torch.full((32, 32, 3), v / 255.0)])  # noqa: E731
    for i, prompt in enumerate(["a fox", "a red fox in the snow at night", LONG]):
        pack.NODE_CLASS_MAPPINGS["PrefAlignAddPair"]().add(images(200 - 20 * i), images(30 + 20 * i), prompt, store)
    return pack.NODE_CLASS_MAPPINGS["PrefAlignLoadStore"]().load(store)["result"][0]


def train_args(**kw):
    args = dict(method="dpo", method_args="", steps=2, learning_rate="1e-2", rank=2, alpha=2.0, batch_size=2,
                gradient_accumulation_steps=1, resolution=32, training_seed=0, checkpoint_every=0, target_modules="auto",
                lora_name="family")
    args.update(kw)
    return args


@pytest.mark.parametrize("name", FLOW)
def test_train_node_two_steps_per_family(pack, comfy_folders, converters, name):
    """The node trains every family end to end with its preset (auto): the cached conditioning of different lengths
    comes back at each row's length, the file names fit the family (diffusers names for SD3/Flux, kohya for the
    others) and its metadata gives the architecture, flow prediction and the flow beta the method used."""
    patcher, clip, vae = ff.make(name)
    out = pack.NODE_CLASS_MAPPINGS["PrefAlignTrainLoRA"]().train(patcher, clip, vae, pairs_of(pack, name), **train_args())
    name_out = out["result"][3]
    with safe_open(str(comfy_folders["loras"] / name_out), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["prefalign.architecture"] == ARCH.get(name, name) and meta["prefalign.prediction_type"] == "flow"
    assert '"beta": 1000.0' in meta["prefalign.method_args"]  # Flow-DPO's beta: the method args left it to the model
    prefix = "transformer." if ARCH.get(name, name) in ("sd3", "flux") else "lora_unet_"
    assert keys and all(k.startswith(prefix) for k in keys)
    lora = out["result"][1]
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_up" in k or "lora_B" in k)  # it trained
    assert [p[0] for p in comfy_folders["calls"]["progress"]] == [1, 2]
    lengths = {r["context"][1] for r in patcher.model.received}
    assert max(lengths) == ff.clip_tokens(LONG, ff.FAMILIES[name]["tokens"])


def test_cache_keeps_each_prompt_at_its_length(pack, comfy_folders, converters):
    """Prompts encoded in different runs (or batches) are cached at their own token length, and a batch mixing them
    comes back padded with each row's size: a second run reuses the first run's short prompts beside a new long one."""
    from safetensors import safe_open

    node = pack.NODE_CLASS_MAPPINGS["PrefAlignTrainLoRA"]()
    images = lambda v: torch.stack([torch.full((32, 32, 3), v / 255.0)])  # noqa: E731
    add = pack.NODE_CLASS_MAPPINGS["PrefAlignAddPair"]()
    for i, prompt in enumerate(["a fox", LONG]):  # encoded together: the short one must not be kept at 301 tokens
        add.add(images(200 - i), images(30 + i), prompt, "c")
    load = lambda: pack.NODE_CLASS_MAPPINGS["PrefAlignLoadStore"]().load("c")["result"][0]  # noqa: E731
    node.train(*ff.make("flux"), load(), **train_args(steps=1))
    add.add(images(100), images(10), "a red fox", "c")
    patcher, clip, vae = ff.make("flux")
    node.train(patcher, clip, vae, load(), **train_args(steps=3, batch_size=3, lora_name="second"))
    assert {r["context"][1] for r in patcher.model.received} == {256, 301}  # both lengths in the second run's batches
    lengths = []
    for shard in (comfy_folders["output"] / "prefalign" / "cache").rglob("shard-*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            lengths += [f.get_slice(k).get_shape()[1] for k in f.keys() if k.endswith("/text.prompt_embeds")]
    assert sorted(lengths) == [256, 256, 301]


def test_node_guidance_and_timestep_sampling_inputs(pack, comfy_folders, converters):
    """guidance -1 is the family's default, another value reaches Flux's guidance input; timestep_sampling picks the
    scheme; both are recorded in the run's config."""
    patcher, clip, vae = ff.make("flux")
    node = pack.NODE_CLASS_MAPPINGS["PrefAlignTrainLoRA"]()
    node.train(patcher, clip, vae, pairs_of(pack, "g"), **train_args(steps=1, guidance=2.0, timestep_sampling="mode"))
    assert {g for r in patcher.model.received for g in r["guidance"]} == {2.0}
    run = next((comfy_folders["output"] / "prefalign" / "runs").iterdir())
    config = (run / "config.toml").read_text()
    assert "guidance = 2.0" in config and 'timestep_sampling = "mode"' in config


def test_trained_guidance_is_the_family_default_unless_set(pack):
    """One rule for the node's guidance input and the backend: guidance-distilled families train at the value given, or
    their default; the others take no guidance, whatever is given."""
    from prefalign_pack.nodes.comfy_families import trained_guidance

    flux, chroma, sd3 = (ff.make(name)[0].model for name in ("flux", "chroma", "sd3"))
    assert trained_guidance(flux, None) == 3.5 and trained_guidance(chroma, None) == 0.0
    assert trained_guidance(flux, 2) == 2.0 and isinstance(trained_guidance(flux, 2), float)
    assert trained_guidance(sd3, None) is None and trained_guidance(sd3, 2.0) is None


def test_unknown_family_lists_its_linear_layers(pack, comfy_folders):
    """A model of no known family takes the generic path: the UNet targets match nothing, so the message lists the
    model's linear layers (block numbers folded) for the user to type; typed, they train."""
    patcher, clip, vae = ff.make("unknown")
    node = pack.NODE_CLASS_MAPPINGS["PrefAlignTrainLoRA"]()
    with pytest.raises(ValueError) as e:
        node.train(patcher, clip, vae, pairs_of(pack, "u"), **train_args())
    message = str(e.value)
    assert "no layer of this model (auraflow) matches target_modules to_q, to_k, to_v, to_out.0" in message
    assert "double_layers.N.attn.w2q" in message and "double_layers.N.mlpX.c_fc1" in message and "\n" not in message
    out = node.train(patcher, clip, vae, pairs_of(pack, "u"), **train_args(target_modules="attn.w2q, mlpX.c_fc1"))
    assert len({k.split(".")[0] for k in out["result"][1]}) == 4  # two blocks x two layers


@pytest.mark.parametrize("method", ["mapo", "dspo"])
def test_methods_without_a_flow_form_stop_before_anything_loads(pack, comfy_folders, method):
    """On a flow model the node refuses MaPO and DSPO with the trainer's message, before encoding a prompt."""
    patcher, clip, vae = ff.make("flux")
    clip.encode_from_tokens = lambda *a, **k: pytest.fail("encoded before refusing")
    with pytest.raises(ValueError, match=rf"method '{method}' does not train flux models \(flow prediction\)"):
        pack.NODE_CLASS_MAPPINGS["PrefAlignTrainLoRA"]().train(patcher, clip, vae, pairs_of(pack, "m"),
                                                               **train_args(method=method))
    assert comfy_folders["calls"]["loads"] == 0


@pytest.mark.parametrize("family", ["chroma", "qwen_image", "lumina2", "wan"])
def test_rpo_stops_before_encoding_on_a_text_encoder_without_a_pooled_vector(pack, comfy_folders, family):
    """RPO's prompt distances compare pooled text vectors; T5/LLM-only families have none: refused up front, where it
    used to fail at the first step after every image was encoded."""
    patcher, clip, vae = ff.make(family)
    clip.encode_from_tokens = lambda *a, **k: pytest.fail("encoded before refusing")
    with pytest.raises(ValueError, match=rf"method 'rpo' compares the prompts' pooled text vectors, and the text "
                                         rf"encoder of this {family} model gives none"):
        pack.NODE_CLASS_MAPPINGS["PrefAlignTrainLoRA"]().train(patcher, clip, vae, pairs_of(pack, "r"),
                                                               **train_args(method="rpo"))
    assert comfy_folders["calls"]["loads"] == 0  # refused from the model's family, before ComfyUI loads it


def test_ncp_space_stops_before_anything_loads_on_a_flow_model(pack, comfy_folders):
    """NCP's posterior step needs a DDPM schedule: the node refuses it on a flow model before loading the model."""
    patcher, clip, vae = ff.make("flux")
    with pytest.raises(ValueError, match="space = 'ncp'.*discrete noise schedule.*flow"):
        pack.NODE_CLASS_MAPPINGS["PrefAlignTrainLoRA"]().train(patcher, clip, vae, pairs_of(pack, "n"),
                                                               **train_args(method_args="space = 'ncp'"))
    assert comfy_folders["calls"]["loads"] == 0


def test_rpo_trains_on_the_pooled_vector_and_refuses_image_embeddings(pack, converters):
    """Flux's CLIP-L gives the pooled vector RPO compares; image embeddings need a CLIP model the node does not load."""
    patcher, clip, vae = ff.make("flux")
    node = pack.NODE_CLASS_MAPPINGS["PrefAlignTrainLoRA"]()
    with pytest.raises(ValueError, match="compares CLIP image embeddings, which need a CLIP model"):
        node.train(patcher, clip, vae, pairs_of(pack, "ri"), **train_args(method="rpo", method_args="embedding = 'both'"))
    out = node.train(patcher, clip, vae, pairs_of(pack, "rp"), **train_args(method="rpo"))
    assert any(v.abs().max() > 0 for k, v in out["result"][1].items() if "lora_B" in k or "lora_up" in k)


def test_method_list_says_which_methods_train_flow_models(pack):
    inputs = pack.NODE_CLASS_MAPPINGS["PrefAlignTrainLoRA"].INPUT_TYPES()
    tooltip = inputs["required"]["method"][1]["tooltip"]
    flow = tooltip.split("Flow models (")[1].split("): ")[1].split(";")[0].split(", ")
    assert "dpo" in flow and "kto" in flow and "mapo" not in flow and "dspo" not in flow
    # the Flow-DPO beta is not pre-filled with the DDPM value: left to the model unless the user sets it
    assert inputs["required"]["method_args"][1]["default"].startswith("# beta = 5000.0 (flow models: 1000")
    assert inputs["required"]["target_modules"][1]["default"] == "auto"


def test_in_place_model_code_trains_with_exact_gradients(pack):
    """Flux's and Chroma's blocks update their residual stream in place after a norm saved it (as ComfyUI's do):
    plain autograd refuses; with the backend's snapshots, and with its checkpointed blocks, the gradient is the one of
    the same model written without in-place updates."""
    def grads(in_place: bool, snapshots: bool = True, checkpointing: bool = False):
        ff.FAMILIES["flux"]["in_place"] = in_place
        try:
            with torch.inference_mode(False):
                _, b = backend("flux", gradient_checkpointing=checkpointing)
                b.snapshots = snapshots
                g = torch.Generator().manual_seed(1)
                for p in b.trainable_parameters():
                    p.data = torch.randn(p.shape, generator=g) * 0.3
                cond = b.encode_prompts(["a fox", "a fox"])
                x = torch.randn(2, 16, 4, 4, generator=g)
                b.predict(x, torch.tensor([3000, 8000]), cond).square().mean().backward()
                b.close()
                return [p.grad for p in b.trainable_parameters()]
        finally:
            ff.FAMILIES["flux"]["in_place"] = True

    reference = grads(in_place=False, snapshots=False)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        grads(in_place=True, snapshots=False)
    for checkpointing in (False, True):
        got = grads(in_place=True, checkpointing=checkpointing)
        assert all(torch.allclose(a, r, atol=1e-6, rtol=1e-5) for a, r in zip(got, reference))


def test_torch_checkpoint_is_wrong_on_blocks_that_update_their_input(pack):
    """Why the pack checkpoints blocks itself: a block that adds to its own input in place (Flux's `txt +=`) gives
    torch's checkpoint a changed input to recompute from; the pack's checkpoint keeps a copy."""
    class Block(torch.nn.Module):
        def __init__(self, in_place: bool):
            super().__init__()
            self.lin, self.in_place = torch.nn.Linear(4, 4), in_place

        def forward(self, x):
            if self.in_place:
                x += torch.tanh(self.lin(x))  # the caller's tensor changes, after `lin` saved it for backward
            else:
                x = x + torch.tanh(self.lin(x))
            return x * 2

    def grad(wrap, in_place: bool = True):
        torch.manual_seed(0)
        block = Block(in_place)
        h = torch.randn(3, 4, requires_grad=True) * 1.0
        out = wrap(block)(h)
        out.square().sum().backward()
        return block.lin.weight.grad

    def plain(block):
        return block

    def theirs(block):
        return lambda x: torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)

    def ours(block):
        block.forward = ckp._checkpointing(block.forward)
        return block

    reference = grad(plain, in_place=False)
    assert torch.allclose(grad(ours), reference, atol=1e-6)
    try:
        wrong = grad(theirs)
    except RuntimeError as e:
        assert "inplace" in str(e)
    else:
        assert not torch.allclose(wrong, reference, atol=1e-3)


def test_sd3_and_flux_files_use_diffusers_names_through_comfyuis_converter(pack, converters):
    """A fused qkv (or Flux's linear1) becomes its diffusers layers, each with the shared down matrix and its rows
    of the up matrix, the scale alpha/rank folded in; a layer ComfyUI's converter only transforms (SD3's adaLN) keeps
    its kohya name with alpha. Both apply to ComfyUI's weight the same update."""
    with torch.inference_mode(False):
        _, b = backend("flux")
        for p in b.trainable_parameters():
            p.data = torch.randn(p.shape)
        lora = b.export_lora()
        a = b.adapters["diffusion_model.single_blocks.1.linear1"]
        parts = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
        up = torch.cat([lora[f"transformer.single_transformer_blocks.1.{p}.lora_B.weight"] for p in parts])
        assert torch.allclose(up, a.lora_up * (a.alpha / a.rank))
        assert all(torch.equal(lora[f"transformer.single_transformer_blocks.1.{p}.lora_A.weight"], a.lora_down) for p in parts)
        assert all(k.startswith("transformer.") for k in lora)

        _, b = backend("sd3", targets=("attn.qkv", "adaLN_modulation.1"))
        lora = b.export_lora()
        assert "lora_unet_joint_blocks_0_x_block_adaLN_modulation_1.alpha" in lora
        assert "transformer.transformer_blocks.0.attn.add_k_proj.lora_B.weight" in lora


def test_weights_in_fp8_and_bf16_train_a_float32_lora(pack):
    """Load Diffusion Model's weight dtypes: the LoRA factors stay float32 (ComfyUI casts a weight to the compute
    dtype before the wrapper adds the update), gradients reach them."""
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        patcher, clip, vae = ff.make("flux")
        with torch.inference_mode():
            for module in patcher.model.diffusion_model.modules():
                if isinstance(module, ff.Linear):
                    module.weight = torch.nn.Parameter(module.weight.to(dtype), requires_grad=False)
        with torch.inference_mode(False):
            b = cb.ComfyBackend(patcher, clip, vae, LoraSpec(2, 2.0, family_of(patcher.model).targets))
            for p in b.trainable_parameters():
                p.data.normal_()
            cond = b.encode_prompts(["a", "a"])
            b.predict(torch.randn(2, 16, 4, 4), torch.tensor([10, 9000]), cond).square().mean().backward()
        assert all(p.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in b.trainable_parameters())
        assert any(p.grad.abs().sum() > 0 for p in b.trainable_parameters())


def test_a_model_too_big_for_the_gpu_is_refused_with_its_size(pack, monkeypatch):
    """Training loads the whole model (no low-VRAM partial loading): when it cannot fit, the node says how much it
    needs and what to do, before loading anything."""
    patcher, clip, vae = ff.make("flux")
    big = fake.ModelPatcher(patcher.model)
    big.load_device, big.model_size = torch.device("cuda"), lambda: 23 * 2 ** 30
    monkeypatch.setattr(patcher, "clone", lambda: big)
    mm = sys.modules["comfy.model_management"]
    monkeypatch.setattr(mm, "get_total_memory", lambda device=None: 12 * 2 ** 30, raising=False)
    monkeypatch.setattr(mm, "load_models_gpu", lambda *a, **k: pytest.fail("loaded"))
    with torch.inference_mode(False), pytest.raises(ValueError) as e:
        cb.ComfyBackend(patcher, clip, vae, LoraSpec(2, 2.0, ("linear1",)))
    assert "its weights take 23.0 GiB" in str(e.value) and "this GPU has 12.0 GiB" in str(e.value)
    assert "fp8_e4m3fn" in str(e.value)


def test_loaded_models_inference_tensors_are_replaced_by_ordinary_copies(pack):
    """ComfyUI's loaders run under inference mode: every parameter and buffer of the model is an inference tensor,
    which autograd refuses to save ("Inference tensors cannot be saved for backward"); the backend swaps each for an
    ordinary copy with the same values."""
    patcher, clip, vae = ff.make("sd3")
    with torch.inference_mode():
        patcher.model.diffusion_model.register_buffer("pos", torch.ones(3))
    before = {k: v.clone() for k, v in patcher.model.state_dict().items()}
    assert all(v.is_inference() for v in patcher.model.state_dict().values())
    with torch.inference_mode(False):
        cb.ComfyBackend(patcher, clip, vae, LoraSpec(2, 2.0, ("attn.qkv",)))
    after = patcher.model.state_dict()
    assert not any(v.is_inference() for v in after.values())
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_concat_rows_pads_every_axis_and_fills_missing_rows():
    rows = [torch.ones(1, 2, 3), None, torch.full((1, 4, 1), 2.0)]
    out = concat_rows(rows)
    expected = np.zeros((3, 4, 3))
    expected[0, :2, :3] = 1
    expected[2, :4, :1] = 2
    assert out.shape == (3, 4, 3) and np.array_equal(out.numpy(), expected)
    same = [torch.ones(1, 2), torch.zeros(1, 2)]
    assert torch.equal(concat_rows(same), torch.cat(same))


def test_one_preset_per_family():
    names = [f.name for f in PRESETS]
    assert set(names) >= {"sd15", "sdxl", "sd3", "flux", "chroma", "qwen_image", "hidream", "lumina2", "wan"}
    assert len(set(names)) == len(names)
    configs = [c for f in PRESETS for c in f.configs]
    assert len(set(configs)) == len(configs)


@pytest.mark.parametrize("family", ["flux", "sd35"])
def test_flow_workflows_curate_then_train_with_stock_loaders(pack, family):
    """The Flux and SD3.5 workflows: stock loaders (Flux: Load Diffusion Model + DualCLIPLoader + Load VAE), the
    gallery first; the training nodes start muted (a first queue curates), and unmuted they queue a Train node on the
    loaders' MODEL/CLIP/VAE with the family preset; notes in the graph say which file goes in which folder."""
    wt = sys.modules["prefalign_workflow_tools"]
    name = wt.FLUX if family == "flux" else wt.SD35
    ui = json.loads((wt.WORKFLOW_DIR / name).read_text())
    info = wt.object_info(prefalign_pack)
    assert wt.validate(ui, info) == []
    first = wt.to_api(ui, info)
    assert {n["class_type"] for n in first.values()} >= {"PrefAlignGalleryPicker", "KSampler"}
    assert "PrefAlignTrainLoRA" not in {n["class_type"] for n in first.values()}
    for n in ui["nodes"]:
        n["mode"] = 0
    api = wt.to_api(ui, info)
    (train,) = [n for n in api.values() if n["class_type"] == "PrefAlignTrainLoRA"]
    sources = {k: api[train["inputs"][k][0]]["class_type"] for k in ("model", "clip", "vae")}
    if family == "flux":
        assert sources == {"model": "UNETLoader", "clip": "DualCLIPLoader", "vae": "VAELoader"}
        assert any(n["class_type"] == "FluxGuidance" for n in api.values())
    else:
        assert sources == {"model": "CheckpointLoaderSimple", "clip": "TripleCLIPLoader", "vae": "CheckpointLoaderSimple"}
    assert train["inputs"]["target_modules"] == "auto" and train["inputs"]["gradient_checkpointing"] is True
    notes = " ".join(n["widgets_values"][0] for n in ui["nodes"] if n["type"] in wt.VIRTUAL)
    folders = ["models/diffusion_models/", "models/text_encoders/", "models/vae/"] if family == "flux" else \
        ["models/checkpoints/", "models/text_encoders/"]
    assert all(folder in notes for folder in folders) and "Ctrl+M" in notes
