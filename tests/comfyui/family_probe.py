"""Train the pack's ComfyUI backend one step on a tiny instance of every model family ComfyUI detects, and load
the exported LoRA back with ComfyUI's own key map (run with ComfyUI's Python; the JSON goes to OUT).

`python family_probe.py COMFYUI_DIR PACK_DIR OUT.json [FAMILY ...]`

Each family's diffusion model is ComfyUI's own class (`comfy/supported_models.py` config -> `model_base`), built
small (one or two blocks, widths of 64-128) and filled with random weights under `torch.inference_mode()` as
ComfyUI's loaders build models; it is sampled once under inference mode first (as a graph would). Its text
encoder and VAE are small stand-ins with the output shapes and keys of the family's real ones (ComfyUI's real
encoders are billions of parameters): a cond of the encoder's width, as many tokens as the prompt has words
(full length, never cut to 77), the pooled vector and the extra outputs (Lumina's attention mask, HiDream's
Llama states). Everything past the encoder is ComfyUI's code.

For each family the JSON records: the targeted layers, the conditioning the model received, the loss gradient
(finite, non-zero), whether the adapter switched off gives the base model, the LoRA keys ComfyUI did not load
("lora key not loaded"), and the largest difference between the weights ComfyUI's LoRA loader patches and the
trained update. SD3 and Flux files also load in diffusers: each diffusers layer's update, mapped back through
ComfyUI's converter, is compared too.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from comfy_server import caught_logs, load_module  # this folder is sys.path[0] of a script run

CTX, POOLED = 64, 32  # stand-in text encoder widths
FAMILIES = {
    "sd3": ("SD3", dict(in_channels=16, patch_size=2, out_channels=16, depth=2, adm_in_channels=POOLED, input_size=None,
                        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": CTX, "out_features": 128}},
                        num_patches=256, pos_embed_max_size=16, qk_norm="rms", pos_embed_scaling_factor=None,
                        x_block_self_attn_layers=[0]), {"pooled": POOLED}),
    "flux": ("Flux", dict(image_model="flux", in_channels=16, patch_size=2, out_channels=16, vec_in_dim=POOLED,
                          context_in_dim=CTX, hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1,
                          axes_dim=[8, 12, 12], theta=10000, qkv_bias=True, guidance_embed=True), {"pooled": POOLED}),
    "chroma": ("Chroma", dict(image_model="chroma", in_channels=64, out_channels=64, patch_size=2, context_in_dim=CTX,
                              hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12],
                              theta=10000, qkv_bias=True, in_dim=64, out_dim=64, hidden_dim=32, n_layers=1), {}),
    "qwen_image": ("QwenImage", dict(image_model="qwen_image", num_layers=1, attention_head_dim=16, num_attention_heads=2,
                                     joint_attention_dim=CTX, axes_dims_rope=(4, 6, 6)), {}),
    "hidream": ("HiDream", dict(image_model="hidream", patch_size=2, in_channels=16, out_channels=16, num_layers=1,
                                num_single_layers=1, attention_head_dim=16, num_attention_heads=2, caption_channels=[CTX, CTX],
                                text_emb_dim=POOLED, num_routed_experts=2, num_activated_experts=1, axes_dims_rope=(4, 6, 6),
                                max_resolution=(32, 32), llama_layers=[0, 1]), {"pooled": POOLED, "llama": 2}),
    "lumina2": ("Lumina2", dict(image_model="lumina2", patch_size=2, in_channels=16, dim=64, n_layers=1, n_refiner_layers=1,
                                n_heads=2, n_kv_heads=2, multiple_of=16, norm_eps=1e-5, qk_norm=True, cap_feat_dim=CTX,
                                axes_dims=[8, 12, 12], axes_lens=[300, 512, 512]), {"mask": True}),
    "wan": ("WAN21_T2V", dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), in_dim=16, dim=64, ffn_dim=128,
                              freq_dim=32, text_dim=CTX, out_dim=16, num_heads=2, num_layers=1, eps=1e-6), {}),
}
PROMPTS = ["a red fox", "a small red fox sleeping under a tall old pine tree in deep fresh snow at dusk"]


class StandInClip:
    """A text encoder object with the interface CLIPTextEncode uses and the family's output shapes."""

    def __init__(self, torch, spec: dict) -> None:
        self.torch, self.spec = torch, spec
        g = torch.Generator().manual_seed(1)
        self.table = torch.randn(4096, CTX, generator=g)

    def tokenize(self, text: str):
        return [sum(w.encode()) * 31 % 4096 for w in text.split()] + [0]

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        torch = self.torch
        cond = self.table[torch.tensor(tokens)][None]  # [1, words + 1, CTX]: as long as the prompt
        out = {"cond": cond, "pooled_output": cond.mean(1)[:, :1].repeat(1, self.spec["pooled"]) if "pooled" in self.spec else None}
        if self.spec.get("mask"):
            out["attention_mask"] = torch.ones(1, cond.shape[1], dtype=torch.long)
        if self.spec.get("llama"):
            out["conditioning_llama3"] = torch.stack([cond * (k + 1) for k in range(self.spec["llama"])], dim=1)
        return out


class StandInVae:
    """`encode(NHWC images in 0..1)` -> unscaled latents with the model's channels (one frame for video models)."""

    def __init__(self, torch, channels: int, video: bool) -> None:
        self.torch, self.channels, self.video = torch, channels, video

    def encode(self, images):
        torch = self.torch
        x = torch.nn.functional.avg_pool2d(images.permute(0, 3, 1, 2) * 2 - 1, 8)
        latent = x.repeat(1, (self.channels + 2) // 3, 1, 1)[:, :self.channels]
        return latent.unsqueeze(2) if self.video else latent


def randomize(torch, module) -> None:
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05
                        + (1.0 if name.endswith(("scale", "norm.weight", "ln_q.weight", "ln_k.weight")) else 0.0))


def sample_once(torch, base, clip, channels: int, video: bool) -> None:
    """One denoising call under inference mode, as a sampler in the graph makes before training (caches fill)."""
    out = clip.encode_from_tokens(clip.tokenize(PROMPTS[0]), return_pooled=True, return_dict=True)
    noise = torch.randn(1, channels, *([1] if video else []), 4, 4)
    kw = {k: v for k, v in out.items() if k not in ("cond", "pooled_output")}
    with torch.inference_mode():
        conds = base.extra_conds(cross_attn=out["cond"], pooled_output=out["pooled_output"], noise=noise, device=noise.device,
                                 width=32, height=32, **kw)
        base.apply_model(noise, torch.tensor([0.5]), **{k: c.process_cond(batch_size=1, device=noise.device, area=None).cond
                                                        for k, c in conds.items()})


def probe(name: str, torch) -> dict:
    import comfy.lora
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models as sm
    import comfy.utils
    from prefalign_pack.nodes.comfy_backend import ComfyBackend
    from prefalign_pack.nodes.comfy_checkpointing import checkpointed, outermost_blocks
    from prefalign_pack.nodes.comfy_families import default_targets
    from prefalign_pack.trainer.models.lora import LoraSpec

    config_name, unet_config, clip_spec = FAMILIES[name]
    config = getattr(sm, config_name)(dict(unet_config))
    with torch.inference_mode():  # as ComfyUI's loader nodes build a model
        base = config.get_model({}, device="cpu")
        randomize(torch, base.diffusion_model)
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    latent_channels = base.latent_format.latent_channels
    video = getattr(base.latent_format, "latent_dimensions", 2) == 3
    clip, vae = StandInClip(torch, clip_spec), StandInVae(torch, latent_channels, video)
    sample_once(torch, base, clip, latent_channels, video)
    seen = {}
    original = base.extra_conds

    def spy(**kw):
        seen.setdefault("calls", []).append({k: list(v.shape) for k, v in kw.items() if hasattr(v, "shape")})
        return original(**kw)

    base.extra_conds = spy
    result = {"architecture": None}
    with torch.inference_mode(False):
        backend = ComfyBackend(patcher, clip, vae, LoraSpec(2, 2.0, default_targets(base)), seed=0)
        result["architecture"] = backend.model_info()["architecture"]
        result["prediction_type"] = backend.prediction_type
        result["targets"] = len(backend.adapters)
        cond = backend.encode_prompts(PROMPTS)
        result["cond_tokens"] = cond["size.prompt_embeds"][:, 0].tolist()
        pixels = torch.rand(2, 3, 32, 32) * 2 - 1
        x0 = backend.encode_images(pixels)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([backend.num_train_timesteps // 4, backend.num_train_timesteps * 3 // 4])
        xt = backend.add_noise(x0, noise, t)
        with torch.no_grad():
            base_pred = backend.predict(xt, t, cond)
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in backend.trainable_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        seen.clear()
        grads = gradients(torch, backend, xt, t, cond, x0, noise)
        # the same gradient without snapshots where ComfyUI's code allows it, and with checkpointed blocks
        backend.snapshots = not backend.snapshots
        try:
            other = gradients(torch, backend, xt, t, cond, x0, noise)
            result["grad_diff_snapshots_toggled"] = relative_diff(grads, other)
        except RuntimeError as e:
            result["grad_diff_snapshots_toggled"] = str(e)[:120]
        backend.snapshots = not backend.snapshots
        with checkpointed(outermost_blocks(base.diffusion_model)):
            result["grad_diff_checkpointed"] = relative_diff(grads, gradients(torch, backend, xt, t, cond, x0, noise))
        result["received"] = seen.get("calls", [])
        result["grad_finite"] = all(bool(torch.isfinite(gr).all()) for gr in grads)
        result["grad_nonzero"] = sum(1 for gr in grads if gr.abs().sum() > 0)
        with torch.no_grad(), backend.reference():
            result["reference_is_base"] = bool(torch.allclose(backend.predict(xt, t, cond), base_pred, atol=1e-5))
        lora = backend.export_lora()
        result["key_prefixes"] = sorted({k.split(".")[0] if k.startswith("transformer.") else k.split("_")[0] for k in lora})
        expected = {n: (a.lora_up @ a.lora_down).detach().reshape(a.shape) * (a.alpha / a.rank)
                    for n, a in backend.adapters.items()}
        backend.close()

    # ComfyUI's own LoRA loading (what LoraLoader runs): every key mapped, the patched weights = base + update
    with caught_logs() as unloaded:
        patches = comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_unet(base, {}))
    result["unloaded"] = [m for m in unloaded if "not loaded" in m]
    before = {k: v.detach().clone() for k, v in base.state_dict().items()}
    loaded = comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    loaded.add_patches(patches, 1.0)
    comfy.model_management.load_models_gpu([loaded])  # as a sampler loads it (the training patcher is unloaded first)
    after = base.state_dict()
    result["patched_modules"] = len({(k if isinstance(k, str) else k[0]) for k in patches})
    result["max_patch_diff"] = max((after[f"{n}.weight"].float() - before[f"{n}.weight"].float() - d).abs().max().item()
                                   for n, d in expected.items())
    comfy.model_management.unload_all_models()
    if name in ("sd3", "flux"):
        result["diffusers"] = diffusers_check(name, comfy, torch, base, lora, expected)
    if name in ("flux", "chroma"):
        result["slope"] = slope_check(torch, config, clip, latent_channels)
    return result


def slope_check(torch, config, clip, channels: int) -> dict:
    """In float64, the derivative of a loss along a random direction of the input projections' weights: by autograd
    with the backend's snapshots, by autograd with torch's own checkpoint, and by a central difference. ComfyUI's
    in-place updates (Flux `+=`, Chroma `addcmul_`) are what the snapshots exist for."""
    import torch.utils.checkpoint
    from prefalign_pack.nodes.comfy_checkpointing import checkpointed, outermost_blocks, snapshot_saved_tensors

    base = config.get_model({}, device="cpu")
    randomize(torch, base.diffusion_model)
    base.diffusion_model.double()
    base.diffusion_model.dtype, base.manual_cast_dtype = torch.float64, None
    out = clip.encode_from_tokens(clip.tokenize(PROMPTS[1]), return_pooled=True, return_dict=True)
    noise = torch.randn(1, channels, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    conds = base.extra_conds(cross_attn=out["cond"].double(), pooled_output=out["pooled_output"], noise=noise,
                             device=noise.device, width=32, height=32, guidance=3.5)
    kw = {k: c.process_cond(batch_size=1, device=noise.device, area=None).cond for k, c in conds.items()}
    weights = [m.weight for n, m in base.diffusion_model.named_modules() if n.endswith(("img_in", "txt_in"))]
    direction = [torch.randn(w.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) for w in weights]

    def loss():
        return base.apply_model(noise, torch.tensor([0.6], dtype=torch.float64), **kw).square().mean()

    def slope(context) -> float:
        for w in weights:
            w.requires_grad_(True)
            w.grad = None
        with context:
            loss().backward()
        for w in weights:
            w.requires_grad_(False)
        return sum((w.grad * d).sum().item() for w, d in zip(weights, direction))

    @__import__("contextlib").contextmanager
    def torch_checkpoint():
        blocks = outermost_blocks(base.diffusion_model)
        for b in blocks:
            b.forward = (lambda f: lambda *a, **k: torch.utils.checkpoint.checkpoint(f, *a, use_reentrant=False, **k))(b.forward)
        try:
            yield
        finally:
            for b in blocks:
                del b.forward

    eps = 1e-4
    with torch.no_grad():
        for w, d in zip(weights, direction):
            w += eps * d
        up = loss().item()
        for w, d in zip(weights, direction):
            w -= 2 * eps * d
        down = loss().item()
        for w, d in zip(weights, direction):
            w += eps * d
    numeric = (up - down) / (2 * eps)
    snapshots = slope(snapshot_saved_tensors())
    with snapshot_saved_tensors(), checkpointed(outermost_blocks(base.diffusion_model)):
        ours = slope(__import__("contextlib").nullcontext())
    try:
        theirs = slope(torch_checkpoint())
    except RuntimeError as e:  # torch notices the block updating its own (kept) input
        theirs = str(e)[:80]
    return {"numeric": numeric, "snapshots": snapshots, "checkpointed": ours, "torch_checkpoint": theirs}


def gradients(torch, backend, xt, t, cond, x0, noise) -> list:
    for p in backend.trainable_parameters():
        p.grad = None
    loss = (backend.predict(xt, t, cond) - backend.target(x0, noise, t)).square().mean()
    loss.backward()
    # a layer whose output the loss never reads (the last block's text MLP in Qwen-Image) gets no gradient: zero
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in backend.trainable_parameters()]


def relative_diff(a: list, b: list) -> float:
    scale = max(g.abs().max().item() for g in a)
    return max((x - y).abs().max().item() for x, y in zip(a, b)) / scale


def diffusers_check(name: str, comfy, torch, base, lora: dict, expected: dict) -> dict:
    """Load the file into a diffusers transformer of the same shape; each diffusers layer's update, mapped through
    ComfyUI's converter onto its ComfyUI weight's rows, must be the trained update."""
    import diffusers

    if name == "sd3":
        model = diffusers.SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64,
                                                num_attention_heads=2, joint_attention_dim=CTX, caption_projection_dim=128,
                                                pooled_projection_dim=POOLED, out_channels=16, pos_embed_max_size=16,
                                                dual_attention_layers=(0,), qk_norm="rms_norm")
        pipeline, convert = diffusers.StableDiffusion3Pipeline, comfy.utils.mmdit_to_diffusers
    else:
        model = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                                 attention_head_dim=32, num_attention_heads=2, joint_attention_dim=CTX,
                                                 pooled_projection_dim=POOLED, guidance_embeds=True, axes_dims_rope=(8, 12, 12))
        pipeline, convert = diffusers.FluxPipeline, comfy.utils.flux_to_diffusers
    with caught_logs("diffusers") as messages:
        state = pipeline.lora_state_dict(dict(lora))
        state = state[0] if isinstance(state, tuple) else state
        model.load_lora_adapter(state, prefix="transformer", adapter_name="prefalign")
    key_map = convert(base.model_config.unet_config, output_prefix="diffusion_model.")
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "prefalign" in getattr(m, "lora_A", {})}
    worst, compared = 0.0, 0
    for layer_name, m in layers.items():
        delta = m.lora_B["prefalign"].weight @ m.lora_A["prefalign"].weight * m.scaling["prefalign"]
        target = key_map[f"{layer_name}.weight"]
        key, rows = (target, None) if isinstance(target, str) else (target[0], target[1])
        want = expected[key[: -len(".weight")]]
        if rows is not None:
            want = want.narrow(rows[0], rows[1], rows[2])
        worst = max(worst, (delta.detach() - want).abs().max().item())
        compared += 1
    return {"layers": compared, "max_diff": worst, "problems": [m for m in messages if "unexpected" in m.lower() or "missing" in m.lower()]}


def main(comfy_dir: str, pack_dir: str, out: str, *families: str) -> None:
    sys.path.insert(0, comfy_dir)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import torch

    import comfy.model_management  # noqa: F401  (reads --cpu)

    load_module("prefalign_pack", Path(pack_dir))
    results = {}
    for name in families or FAMILIES:
        try:
            results[name] = probe(name, torch)
        except Exception as e:  # one family's failure is reported, the others still run
            import traceback

            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
