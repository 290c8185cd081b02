"""The ComfyUI backend and the Train node on fake ComfyUI objects (CPU, a second or two)."""
from __future__ import annotations

import errno
import sys

import pytest
import torch
from safetensors import safe_open

import prefalign_pack

fake = sys.modules["prefalign_fake_comfy"]
import prefalign_pack.nodes.comfy_backend as cb  # noqa: E402
import prefalign_pack.nodes.comfy_checkpointing as ckp  # noqa: E402
from prefalign_pack.trainer.models.lora import LoraSpec  # noqa: E402

LORA = LoraSpec(2, 2.0, ("to_q", "to_k", "to_v", "to_out.0"))


def backend(seed=0, **kw):
    patcher = fake.make_model_patcher(seed)
    return patcher, cb.ComfyBackend(patcher, fake.CLIP(), fake.VAE(), LORA, **kw)


def randomize(b, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in b.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_backend_basics(pack):
    patcher, b = backend()
    assert b.prediction_type == "epsilon" and b.num_train_timesteps == 1000
    assert len(b.adapters) == 8 and all(k.startswith("diffusion_model.") for k in b.adapters)
    assert not patcher.weight_wrapper_patches  # the graph's MODEL is untouched: the backend trains a clone
    cond = b.encode_prompts(["a", "b"])
    assert cond["prompt_embeds"].shape == (2, 77, 8) and cond["pooled"].shape == (2, 8)
    lat = b.encode_images(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert lat.shape == (2, 4, 4, 4)
    info = b.model_info()
    assert info["architecture"] == "sd15" and len(info["hash"]) == 16


def test_model_info_fingerprints_the_frozen_model_once(pack):
    """The fingerprint reads the three models' state dicts once per backend (the trainer asks 3-4 times a run); the
    LoRA factors are in none of them (ComfyUI's weight wrappers hang in plain lists), so training cannot change it."""
    _, b = backend()
    b.patcher.load()  # the LoRA's wrappers attached, as for a forward pass
    unet = b.base.diffusion_model
    assert not any("lora" in k for k in unet.state_dict()) and unet.input_blocks[0].attn1.to_q.weight_function
    first = b.model_info()
    read = []
    unet.state_dict = lambda *a, **k: read.append(1) or {}
    randomize(b)
    assert b.model_info() == first and not read
    b.model_info()["hash"] = "changed"  # a caller's copy
    assert b.model_info() == first


def test_reference_is_base_and_grads_reach_adapter(pack):
    with torch.inference_mode(False):
        _, b = backend()
        cond = b.encode_prompts(["a", "b"])
        x0 = torch.randn(2, 4, 4, 4)
        noise = torch.randn(2, 4, 4, 4)
        t = torch.tensor([10, 700])
        xt = b.add_noise(x0, noise, t)
        base_eps = b.predict(xt, t, cond)
        # eps really is the UNet's output on ComfyUI's scaled input
        s = b._sigmas[t].view(-1, 1, 1, 1)
        unet = b.base.diffusion_model
        with b.reference():
            direct = unet(xt * (1 + s ** 2).sqrt() / (s ** 2 + 1).sqrt(), b.base.model_sampling.timestep(b._sigmas[t]), context=cond["prompt_embeds"])
        assert torch.allclose(base_eps, direct, atol=1e-4)
        with torch.no_grad(), b.reference():
            ref0 = b.predict(xt, t, cond)
        with torch.no_grad():  # a zero-initialised LoRA is exactly the base model (same kernels without grad)
            assert torch.equal(b.predict(xt, t, cond), ref0)
        assert torch.allclose(base_eps, ref0, atol=1e-5)  # with grad, kernels may differ in the last bit
        randomize(b)
        policy = b.predict(xt, t, cond)
        with torch.no_grad(), b.reference():
            ref = b.predict(xt, t, cond)
        assert torch.equal(ref, ref0)
        assert not torch.allclose(policy, ref)
        loss = ((policy - b.target(x0, noise, t)) ** 2).mean()
        loss.backward()
        grads = [p.grad for p in b.trainable_parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
        assert all(not p.requires_grad for p in b.base.parameters())
        feats = b.encoder_features(xt, t, cond)
        assert feats.shape[0] == 2 and feats.dim() == 2


def test_export_matches_comfy_lora_math(pack):
    """The exported kohya file, applied the way ComfyUI's LoRA loader does, gives the trained policy."""
    with torch.inference_mode(False):
        _, b = backend()
        randomize(b)
        cond = b.encode_prompts(["x"])
        xt, t = torch.randn(1, 4, 4, 4), torch.tensor([400])
        policy = b.predict(xt, t, cond)
        lora = b.export_lora()
        assert all(k.startswith("lora_unet_") for k in lora)
        assert "lora_unet_input_blocks_0_attn1_to_out_0.lora_up.weight" in lora
        assert {k.rsplit(".", 2)[-2] if k.endswith("weight") else "alpha" for k in lora} == {"lora_up", "lora_down", "alpha"}
        baked = fake.make_model_patcher(0)
        fake.apply_kohya(baked, lora)
        b2 = cb.ComfyBackend(baked, fake.CLIP(), fake.VAE(), LORA)
        with b2.reference():
            out = b2.predict(xt, t, cond)
        assert torch.allclose(out, policy, atol=1e-5)
        # adapter state round trip
        state = b.adapter_state_dict()
        b2.load_adapter_state_dict(state)
        assert all(torch.equal(state[k], v) for k, v in b2.adapter_state_dict().items())
        with pytest.raises(ValueError, match="does not match"):
            b2.load_adapter_state_dict({"x": torch.zeros(1)})


def test_no_matching_targets(pack):
    with pytest.raises(ValueError, match="target_modules"):
        cb.ComfyBackend(fake.make_model_patcher(), fake.CLIP(), fake.VAE(), LoraSpec(2, 2.0, ("qkv",)))


def store_pairs(pack, n=4):
    images = lambda v: torch.stack([torch.full((32, 32, 3), v / 255.0)])  # noqa: E731
    for i in range(n):
        pack.NODE_CLASS_MAPPINGS["PrefAlignAddPair"]().add(images(200 - i), images(20 + i), f"prompt {i}", "t")
    return pack.NODE_CLASS_MAPPINGS["PrefAlignLoadStore"]().load("t")["result"][0]


def train_args(**kw):
    args = dict(method="dpo", method_args="beta = 2500", steps=3, learning_rate=1e-3, rank=2, alpha=2.0, batch_size=2,
                gradient_accumulation_steps=1, resolution=32, training_seed=0, checkpoint_every=0,
                target_modules="to_q, to_k, to_v, to_out.0", lora_name="my lora")
    args.update(kw)
    return args


def test_train_node(pack, comfy_folders):
    pairs = store_pairs(pack)
    node = pack.NODE_CLASS_MAPPINGS["PrefAlignTrainLoRA"]()
    model = fake.make_model_patcher()
    out = node.train(model, fake.CLIP(), fake.VAE(), pairs, **train_args())
    model_out, lora, curve, name = out["result"]
    assert name.startswith("prefalign/my_lora_dpo_3steps_") and name.endswith(".safetensors")
    path = comfy_folders["loras"] / name
    assert path.is_file()
    assert name in sys.modules["folder_paths"].get_filename_list("loras")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["prefalign.method"] == "dpo" and meta["prefalign.steps"] == "3" and meta["prefalign.dataset"] == "store:t"
    assert '"beta": 2500' in meta["prefalign.method_args"]
    assert keys == set(lora) and all(k.startswith("lora_unet_") for k in keys)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_up" in k)  # it trained
    assert set(model_out.lora) == keys and not model.lora  # LoRA applied to a clone; the input MODEL is unchanged
    assert curve.shape[0] == 1 and curve.shape[-1] == 3 and curve.dtype == torch.float32
    calls = comfy_folders["calls"]
    assert [p[0] for p in calls["progress"]] == [1, 2, 3]
    events = [m for m in calls["messages"] if m[0] == "prefalign.train"]
    assert events[0][1]["status"] == "running" and events[-1][1]["status"] == "done"
    assert sum(len(e[1]["points"]) for e in events) == 3
    status = pack.nodes.live.snapshot()
    assert any(r["lora"] == name and len(r["loss"]) == 3 for r in status.values())
    run_dirs = list((comfy_folders["output"] / "prefalign" / "runs").iterdir())
    assert len(run_dirs) == 1 and (run_dirs[0] / "metrics.jsonl").is_file()


def test_train_node_interrupt_keeps_lora(pack, comfy_folders):
    pairs = store_pairs(pack)
    calls = comfy_folders["calls"]
    progress = sys.modules["comfy.utils"].ProgressBar

    class Interrupting(progress):
        def update_absolute(self, value, total=None, preview=None):
            if value == 2:
                calls["interrupt"] = True  # the user presses Cancel during step 2; the hook raises
            super().update_absolute(value, total, preview)

    sys.modules["comfy.utils"].ProgressBar = Interrupting
    node = pack.NODE_CLASS_MAPPINGS["PrefAlignTrainLoRA"]()
    with pytest.raises(fake.InterruptProcessingException):
        node.train(fake.make_model_patcher(), fake.CLIP(), fake.VAE(), pairs, **train_args(steps=50))
    files = list((comfy_folders["loras"] / "prefalign").glob("*.safetensors"))
    assert len(files) == 1 and "_2steps_" in files[0].name
    run_dir = next((comfy_folders["output"] / "prefalign" / "runs").iterdir())
    assert list((run_dir / "checkpoints").iterdir())  # the last checkpoint is kept
    events = [m[1] for m in calls["messages"] if m[0] == "prefalign.train"]
    assert events[-1]["status"] == "stopped" and events[-1]["lora"].endswith(files[0].name)


def test_method_args_validation(pack):
    tn = pack.nodes.train_node
    assert tn.parse_method_args("dpo", "") == {}
    assert tn.parse_method_args("dpo", "beta = 100\nloss_type = 'hinge'") == {"beta": 100, "loss_type": "hinge"}
    assert tn.parse_method_args("dpo", '{"beta": 7}') == {"beta": 7}
    with pytest.raises(ValueError, match="has no hyper-parameter gamma"):
        tn.parse_method_args("dpo", "gamma = 1")
    with pytest.raises(ValueError, match="TOML"):
        tn.parse_method_args("dpo", "beta ==")
    with pytest.raises(ValueError, match="unknown method"):
        tn.parse_method_args("nope", "")
    inputs = pack.NODE_CLASS_MAPPINGS["PrefAlignTrainLoRA"].INPUT_TYPES()["required"]
    assert "dpo" in inputs["method"][0] and "beta = 5000" in inputs["method_args"][1]["default"]


def test_loss_plot(pack):
    import importlib

    loss_plot = importlib.import_module(f"{prefalign_pack.__name__}.nodes.loss_plot")
    img = loss_plot.plot_loss([(1, 0.7), (2, 0.6), (3, float("nan")), (4, 0.5)])
    assert img.size == (640, 360)
    loss_plot.plot_loss([])
    loss_plot.plot_loss([(1, 0.5)])


def test_sdxl_style_conditioning_reaches_extra_conds(pack):
    """Pooled output and per-row SDXL size conditioning (time_ids) go to ComfyUI's extra_conds per row."""
    with torch.inference_mode(False):
        _, b = backend()
        seen = []
        original = b.base.extra_conds

        def spy(**kw):
            seen.append(kw)
            return original(**kw)

        b.base.extra_conds = spy
        cond = b.encode_prompts(["a", "b"])
        cond["time_ids"] = torch.tensor([[512.0, 768, 0, 16, 64, 64], [1024, 1024, 8, 0, 64, 64]])
        b.predict(torch.randn(2, 4, 8, 8), torch.tensor([5, 500]), cond)
    assert [k["height"] for k in seen] == [512, 1024] and [k["width"] for k in seen] == [768, 1024]
    assert [k["crop_w"] for k in seen] == [16, 0] and [k["crop_h"] for k in seen] == [0, 8]
    assert all(k["pooled_output"].shape == (1, 8) for k in seen)


def test_v_prediction_target_and_prediction_agree(pack):
    """For a v-prediction model, predict() returns v computed from ComfyUI's x0, consistent with target()."""
    with torch.inference_mode(False):
        _, b = backend()
        b.prediction_type = "v_prediction"
        x0, noise, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([100, 900])
        xt = b.add_noise(x0, noise, t)
        # an oracle model that returns the true x0: its v must equal the target exactly (up to float error)
        b.base.apply_model = lambda x, sigma, **kw: x0
        assert torch.allclose(b.predict(xt, t, b.encode_prompts(["a", "b"])), b.target(x0, noise, t), atol=1e-4)
        b.prediction_type = "epsilon"
        assert torch.allclose(b.predict(xt, t, b.encode_prompts(["a", "b"])), noise, atol=1e-4)


def test_cancel_while_encoding_stops_before_training(pack, comfy_folders):
    pairs = store_pairs(pack)
    comfy_folders["calls"]["interrupt"] = True  # Cancel pressed while the pairs are being encoded
    node = pack.NODE_CLASS_MAPPINGS["PrefAlignTrainLoRA"]()
    with pytest.raises(fake.InterruptProcessingException):
        node.train(fake.make_model_patcher(), fake.CLIP(), fake.VAE(), pairs, **train_args(steps=50))
    assert not (comfy_folders["loras"] / "prefalign").exists()
    events = [m[1] for m in comfy_folders["calls"]["messages"] if m[0] == "prefalign.train"]
    assert events[-1]["status"] == "stopped" and comfy_folders["calls"]["progress"] == []


def test_architecture_follows_the_model_config_family(pack):
    """Distilled SDXL models (KOALA, SSD-1B: subclasses of ComfyUI's SDXL config) are `sdxl`; unknown ones keep their name."""
    class SDXL: ...
    class KOALA_700M(SDXL): ...
    class Flux: ...

    def model_with(config_class):
        return type("M", (), {"model_config": config_class()})()

    assert cb.architecture_of(model_with(KOALA_700M)) == "sdxl"
    assert cb.architecture_of(model_with(SDXL)) == "sdxl"
    assert cb.architecture_of(model_with(Flux)) == "flux"


def test_gradient_checkpointing_same_gradients_and_restored(pack):
    """Checkpointed blocks give the same gradients, recompute in backward, and leave the shared UNet as it was."""
    calls = []

    def grads(checkpointing: bool):
        patcher = fake.make_model_patcher(0)
        unet = patcher.model.diffusion_model
        inner = unet.input_blocks[0].attn1.to_q  # inside a checkpointed block: runs again when recomputed
        handle = inner.register_forward_hook(lambda *a: calls.append(torch.is_grad_enabled()))
        with torch.inference_mode(False), cb.ComfyBackend(patcher, fake.CLIP(), fake.VAE(), LORA,
                                                          gradient_checkpointing=checkpointing) as b:
            randomize(b)
            blocks = ckp.outermost_blocks(unet)
            assert all(("forward" in m.__dict__) == checkpointing for m in blocks)
            cond = b.encode_prompts(["a", "b"])
            x, t = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3)), torch.tensor([10, 700])
            with torch.no_grad():
                b.predict(x, t, cond)
            assert calls == [False]  # no recomputation bookkeeping without grad (sampling, reference)
            calls.clear()
            b.predict(x, t, cond).square().mean().backward()
            out = [p.grad.clone() for p in b.trainable_parameters()]
        handle.remove()
        assert not any("forward" in m.__dict__ for m in blocks)  # restored on exit
        return out

    plain = grads(False)
    assert calls == [True]
    calls.clear()
    checkpointed = grads(True)
    assert calls == [True, True]  # the forward pass, then the recomputation in backward
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed))


def test_train_node_resume_continues_the_cancelled_run(pack, comfy_folders, monkeypatch):
    """Cancel at step 2 of 5, then resume: the LoRA equals an uninterrupted 5-step run; no earlier run: a clear error."""
    pairs = store_pairs(pack)
    node = pack.NODE_CLASS_MAPPINGS["PrefAlignTrainLoRA"]()
    with pytest.raises(ValueError, match="no earlier run of 'again-dpo'"):
        node.train(fake.make_model_patcher(), fake.CLIP(), fake.VAE(), pairs, **train_args(lora_name="again", resume=True))
    straight = node.train(fake.make_model_patcher(), fake.CLIP(), fake.VAE(), pairs,
                          **train_args(steps=5, lora_name="straight"))["result"][1]

    utils = sys.modules["comfy.utils"]
    progress, calls = utils.ProgressBar, comfy_folders["calls"]

    class Interrupting(progress):
        def update_absolute(self, value, total=None, preview=None):
            calls["interrupt"] = calls["interrupt"] or value == 2
            super().update_absolute(value, total, preview)

    utils.ProgressBar = Interrupting
    with pytest.raises(fake.InterruptProcessingException):
        node.train(fake.make_model_patcher(), fake.CLIP(), fake.VAE(), pairs, **train_args(steps=5, lora_name="again"))
    utils.ProgressBar = progress
    before, sent = len(calls["progress"]), len(calls["messages"])
    plotted = []
    loss_plot = sys.modules[f"{prefalign_pack.__name__}.nodes.loss_plot"]
    monkeypatch.setattr(loss_plot, "plot_loss", lambda points, title: plotted.append(list(points)) or loss_plot.Image.new("RGB", (8, 8)))
    out = node.train(fake.make_model_patcher(), fake.CLIP(), fake.VAE(), pairs,
                     **train_args(steps=5, lora_name="again", resume=True))
    _, resumed, _, name = out["result"]
    assert "_5steps_" in name and [p[0] for p in calls["progress"][before:]] == [3, 4, 5]
    # the loss curve and the live chart cover the whole run, the cancelled session's steps included
    assert [s for s, _ in plotted[0]] == [1, 2, 3, 4, 5]
    assert [p[0] for p in pack.nodes.live.snapshot()["None"]["loss"]] == [1, 2, 3, 4, 5]
    chart = [m[1] for m in calls["messages"][sent:] if m[0] == "prefalign.train"]
    assert [p[0] for m in chart for p in m["points"]] == [1, 2, 3, 4, 5]
    runs = sorted(d.name for d in (comfy_folders["output"] / "prefalign" / "runs").iterdir())
    assert len(runs) == 2 and runs[0].startswith("again-dpo-")  # the cancelled run's folder was continued
    assert set(resumed) == set(straight)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_ncp_space_is_refused_for_models_without_a_ddpm_schedule(pack):
    """NCP's posterior step needs alphas_cumprod: a flow model gets a clear error before any encoding."""
    from prefalign_pack.trainer.config import make_config
    from prefalign_pack.trainer.loop import train

    with torch.inference_mode(False):
        _, b = backend()
        b.prediction_type, b.alphas_cumprod = "flow", None
        b.encode_prompts = lambda prompts: pytest.fail("encoded before refusing")
        config = make_config({"model": "comfyui", "data": "x", "method": "dpo", "method_args": {"space": "ncp"},
                              "max_steps": 1, "output_dir": "unused"})
        with pytest.raises(ValueError, match="space = 'ncp'.*discrete noise schedule.*flow"):
            train(config, b, store_pairs(pack))


def test_flow_models_train_in_comfyui_flow_space(pack, comfy_folders):
    """A rectified-flow MODEL (ComfyUI's CONST sampling: SD3, Flux, or any model after the ModelSamplingSD3
    node's object patch): x_t and the target follow ComfyUI's own noise scaling, an oracle x0 gives exactly
    the target, and the Train node trains it end to end."""
    def flow_patcher():  # as ComfyUI's ModelSamplingSD3 node makes it: an object patch on a clone
        patcher = fake.make_model_patcher().clone()
        patcher.add_object_patch("model_sampling", fake.ModelSamplingDiscreteFlow(shift=3.0))
        return patcher

    with torch.inference_mode(False):
        b = cb.ComfyBackend(flow_patcher(), fake.CLIP(), fake.VAE(), LORA)
        assert b.prediction_type == "flow" and b.alphas_cumprod is None
        g = torch.Generator().manual_seed(0)
        x0, noise, t = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g), torch.tensor([99, 749])
        sigma = torch.tensor([3 * 0.1 / (1 + 2 * 0.1), 3 * 0.75 / (1 + 2 * 0.75)]).view(-1, 1, 1, 1)  # SD3's shift 3
        xt = b.add_noise(x0, noise, t)
        assert torch.allclose(xt, fake.ModelSamplingDiscreteFlow.noise_scaling(sigma, noise, x0))
        assert torch.allclose(b.target(x0, noise, t), noise - x0)
        b.base.apply_model = lambda x, s, **kw: x0  # an oracle that returns the true x0
        assert torch.allclose(b.predict(xt, t, b.encode_prompts(["a", "b"])), noise - x0, atol=1e-4)

    pairs = store_pairs(pack)
    out = pack.NODE_CLASS_MAPPINGS["PrefAlignTrainLoRA"]().train(flow_patcher(), fake.CLIP(), fake.VAE(), pairs,
                                                                 **train_args(lora_name="flow"))
    lora = out["result"][1]
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_up" in k)
    assert [p[0] for p in comfy_folders["calls"]["progress"]] == [1, 2, 3]


def test_train_node_shows_its_result_as_pack_text(pack, comfy_folders):
    """The frontend ignores `ui.text`: the node's result goes in `ui.prefalign_text`, which the pack's widget shows."""
    out = pack.NODE_CLASS_MAPPINGS["PrefAlignTrainLoRA"]().train(fake.make_model_patcher(), fake.CLIP(), fake.VAE(),
                                                                 store_pairs(pack), **train_args())
    name = out["result"][3]
    assert out["ui"]["prefalign_text"] == [f"saved models/loras/{name} (3 steps)"]
    assert "text" not in out["ui"]


def test_train_node_builds_the_lora_settings_once(pack, comfy_folders, monkeypatch):
    """One LoraSpec, from the run's config, reaches the backend; the file's rank/alpha are that spec's."""
    seen = []
    real = cb.ComfyBackend

    def spy(model, clip, vae, lora, **kw):
        seen.append(lora)
        return real(model, clip, vae, lora, **kw)

    monkeypatch.setattr(cb, "ComfyBackend", spy)
    out = pack.NODE_CLASS_MAPPINGS["PrefAlignTrainLoRA"]().train(
        fake.make_model_patcher(), fake.CLIP(), fake.VAE(), store_pairs(pack),
        **train_args(rank=3, alpha=1.5, target_modules=" to_q ,to_v,"))
    assert seen == [LoraSpec(3, 1.5, ("to_q", "to_v"))]
    with safe_open(str(comfy_folders["loras"] / out["result"][3]), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_network_dim"] == "3" and meta["ss_network_alpha"] == "1.5"
    assert {k.split(".")[0].rsplit("_", 1)[-1] for k in keys} == {"q", "v"}


@pytest.mark.parametrize("text, rate", [("1e-8", 1e-8), ("5e-7", 5e-7), (" 0.00002 ", 2e-5), ("1", 1.0), (5e-7, 5e-7), (0.05, 0.05)])
def test_learning_rate_is_text_the_frontend_does_not_round(pack, text, rate):
    cls = pack.NODE_CLASS_MAPPINGS["PrefAlignTrainLoRA"]
    spec = cls.INPUT_TYPES()["required"]["learning_rate"]
    assert spec[0] == "STRING" and spec[1]["default"] == "1e-4"  # FLOAT widgets are rounded to their precision
    assert cls.VALIDATE_INPUTS(learning_rate=text) is True  # numbers: API graphs saved when the input was FLOAT
    assert pack.nodes.train_node.parse_learning_rate(text) == rate


@pytest.mark.parametrize("text", ["0", "2", "-1e-5", "1e-9", "abc", "", "nan", "inf", True, None])
def test_learning_rate_refused_when_queued(pack, text):
    message = pack.NODE_CLASS_MAPPINGS["PrefAlignTrainLoRA"].VALIDATE_INPUTS(learning_rate=text)
    assert isinstance(message, str) and message.startswith("learning_rate ") and "\n" not in message


def test_paper_scale_learning_rate_reaches_the_run(pack, comfy_folders):
    out = pack.NODE_CLASS_MAPPINGS["PrefAlignTrainLoRA"]().train(fake.make_model_patcher(), fake.CLIP(), fake.VAE(),
                                                                 store_pairs(pack), **train_args(learning_rate="5e-7"))
    with safe_open(str(comfy_folders["loras"] / out["result"][3]), "pt") as f:
        assert float(f.metadata()["ss_learning_rate"]) == 5e-7


def test_argument_error_ends_the_previous_runs_chart(pack, comfy_folders):
    """A run refused for its arguments replaces the finished run's chart with the error (not the old 'done')."""
    node, pairs = pack.NODE_CLASS_MAPPINGS["PrefAlignTrainLoRA"](), store_pairs(pack)
    node.train(fake.make_model_patcher(), fake.CLIP(), fake.VAE(), pairs, **train_args())
    assert pack.nodes.live.snapshot()["None"]["status"] == "done"
    sent = len(comfy_folders["calls"]["messages"])
    with pytest.raises(ValueError, match="has no hyper-parameter gamma"):
        node.train(fake.make_model_patcher(), fake.CLIP(), fake.VAE(), pairs, **train_args(method_args="gamma = 1"))
    run = pack.nodes.live.snapshot()["None"]
    assert run["status"] == "error" and "gamma" in run["message"] and run["loss"] == [] and run["lora"] is None
    chart = [m[1] for m in comfy_folders["calls"]["messages"][sent:] if m[0] == "prefalign.train"]
    assert [m["status"] for m in chart] == ["running", "error"] and chart[0]["points"] == []


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_copying_into_models_loras(pack, comfy_folders, monkeypatch):
    """The copy into models/loras is atomic: a full disk leaves no temp file, says what was kept, ends the chart."""
    def copy_half(src, dst):
        with open(dst, "wb") as f:
            f.write(b"x" * 100)
        _full_disk()

    monkeypatch.setattr(pack.nodes.train_node.shutil, "copyfile", copy_half)
    with pytest.raises(OSError, match=r"disk full while copying the LoRA into models/loras/prefalign/my_lora_dpo_3steps_"
                                      r".*kept in output/prefalign/runs/my_lora-dpo-\d{8}-\d{6}/lora.safetensors") as e:
        pack.NODE_CLASS_MAPPINGS["PrefAlignTrainLoRA"]().train(fake.make_model_patcher(), fake.CLIP(), fake.VAE(),
                                                               store_pairs(pack), **train_args())
    assert e.value.errno == errno.ENOSPC
    assert list((comfy_folders["loras"] / "prefalign").iterdir()) == []  # no .tmp left behind
    run = pack.nodes.live.snapshot()["None"]
    assert run["status"] == "error" and "disk full" in run["message"]


def test_disk_full_appending_metrics(pack, comfy_folders, monkeypatch):
    """metrics.jsonl on a full disk: the trainer's documented message (no raw OSError traceback), chart ended."""
    import prefalign_pack.trainer.metrics as metrics

    real_open = open

    def open_full(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            f.write = _full_disk
        return f

    monkeypatch.setattr(metrics, "open", open_full, raising=False)
    with pytest.raises(OSError, match=r"disk full while appending step 1 to .*metrics.jsonl; the lines before it are "
                                      r"intact.*turn resume on and queue again") as e:
        pack.NODE_CLASS_MAPPINGS["PrefAlignTrainLoRA"]().train(fake.make_model_patcher(), fake.CLIP(), fake.VAE(),
                                                               store_pairs(pack), **train_args())
    assert type(e.value).__name__ == "DiskFullError" and e.value.__cause__ is None
    assert pack.nodes.live.snapshot()["None"]["status"] == "error"
    assert not (comfy_folders["loras"] / "prefalign").exists()
