"""The trainer's `Backend` over ComfyUI objects: the graph's MODEL (a ModelPatcher), CLIP and VAE.

- LoRA: one small trainable module per targeted weight, attached with `ModelPatcher.add_weight_wrapper`
  (ComfyUI's weight-wrapper hook, the one its native LoRA trainer uses), so any model family ComfyUI
  samples works. The reference is the same patcher with every wrapper switched off: one UNet in memory.
- Timesteps are integers in [0, num_train_timesteps) as in the trainer; ComfyUI works in sigmas
  (k-diffusion space x = x0 + sigma * eps). The forward process is the trainer's (`trainer.forward_process`),
  on the model's own schedule: DDPM alphas_cumprod = 1 / (1 + sigma^2) from ComfyUI's sigma table, or for
  flow models (CONST sampling) the model's (shifted) sigma table itself. `predict` maps x_t to ComfyUI's
  space, runs `apply_model`, and turns its x0 into the output the trainer's losses expect (eps, v or the
  flow velocity eps - x0).
- Latents: `encode_images` runs the VAE and `process_latent_in` (ComfyUI's VAE output is unscaled).
- Export: kohya names `lora_unet_<ComfyUI diffusion_model path with _>` that ComfyUI's LoraLoader
  maps for every model family, with `.alpha`.
- Gradient checkpointing wraps the UNet's outermost blocks (as ComfyUI's own trainer does) for the
  life of the backend; use it as a context manager so the shared UNet gets its forwards back.
"""
from __future__ import annotations

import hashlib
from contextlib import ExitStack, contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from ..trainer.forward_process import Schedule, TimestepSampling
from ..trainer.models.lora import LoraSpec
from .comfy_checkpointing import checkpointed, outermost_blocks
from .comfy_lora import PREFIX, LoraWeight, identity_wrapper, kohya_name, matches_target

TOKENS = 77  # prompt conditioning is cut/padded to one CLIP chunk so rows of every batch concatenate


FAMILIES = {"SD15": "sd15", "SDXL": "sdxl", "SD20": "sd2", "SDXLRefiner": "sdxl-refiner"}


def architecture_of(base_model) -> str:
    """The model family, from ComfyUI's model config class or its nearest known base (KOALA, SSD-1B -> sdxl)."""
    config_class = type(getattr(base_model, "model_config", None))
    for cls in config_class.__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    return config_class.__name__.lower()


class ComfyBackend:
    """Implements `trainer.models.backend.Backend` for a ComfyUI MODEL / CLIP / VAE.

    Use it as a context manager: gradient checkpointing patches the blocks of the UNet that the graph's
    MODEL shares, and leaving the context restores them.
    """

    def __init__(self, model, clip, vae, lora: LoraSpec, seed: int = 0, model_name: str = "",
                 gradient_checkpointing: bool = False) -> None:
        import comfy.model_management as mm

        self.mm = mm
        self.clip, self.vae = clip, vae
        self.lora = lora
        self.rank, self.alpha = int(lora.rank), float(lora.alpha)
        self.model_name = model_name
        self.cancel_while_encoding = True  # the Train node turns this off once a step is done
        self.patcher = model.clone()
        base = self.patcher.model
        self.base = base
        self.sampling = self.patcher.get_model_object("model_sampling")  # with object patches (ModelSampling* nodes)
        kind = type(self.sampling).__mro__
        kinds = {k.__name__ for k in kind}
        if "CONST" in kinds:
            self.prediction_type = "flow"
        elif "V_PREDICTION" in kinds:
            self.prediction_type = "v_prediction"
        elif "EPS" in kinds:
            self.prediction_type = "epsilon"
        else:
            raise ValueError(f"model sampling {type(self.sampling).__name__} is not supported for training")
        # the model's own sigma table (flow models: shifted, as their schedulers train), else uniform flow sigmas
        table = getattr(self.sampling, "sigmas", None)
        self._sigmas = table.detach().float().cpu().clone() if table is not None else None
        self.num_train_timesteps = int(self._sigmas.shape[0]) if self._sigmas is not None else 1000
        self.discrete = self._sigmas is not None and self.prediction_type != "flow"
        self.alphas_cumprod = 1.0 / (1.0 + self._sigmas ** 2) if self.discrete else None
        if self.discrete:
            self.schedule = Schedule(alphas_cumprod=self.alphas_cumprod)
        else:  # flow: sigma in (0, 1], the model's table when it has one
            steps = torch.arange(1, self.num_train_timesteps + 1, dtype=torch.float32) / self.num_train_timesteps
            self.schedule = Schedule(sigmas=self._sigmas if self._sigmas is not None else steps)
        self.timestep_sampling = TimestepSampling(self.num_train_timesteps)

        generator = torch.Generator().manual_seed(int(seed))
        self.adapters: dict[str, LoraWeight] = {}
        inference_weights = any(p.is_inference() for p in base.diffusion_model.parameters())
        for name, module in base.named_modules():
            if not hasattr(module, "weight_function") or not name.startswith(PREFIX):
                continue
            weight = getattr(module, "weight", None)
            bias = getattr(module, "bias", None)
            if weight is not None and weight.dim() >= 2 and matches_target(name, lora.target_modules):
                adapter = LoraWeight(weight.shape, self.rank, self.alpha, generator)
                self.adapters[name] = adapter
                self.patcher.add_weight_wrapper(f"{name}.weight", adapter)
            elif weight is not None and inference_weights:
                self.patcher.add_weight_wrapper(f"{name}.weight", identity_wrapper)
            if bias is not None and inference_weights:
                self.patcher.add_weight_wrapper(f"{name}.bias", identity_wrapper)
        if not self.adapters:
            raise ValueError(f"no layer of this model matches target_modules {list(lora.target_modules)}")
        self.lora_modules = nn.ModuleDict({k.replace(".", "__"): v for k, v in self.adapters.items()})
        for p in base.parameters():  # frozen base (ComfyUI's weights may be inference tensors: no-op then)
            if p.requires_grad:
                p.requires_grad_(False)
        mm.load_models_gpu([self.patcher], memory_required=1e20, force_full_load=True)
        self.device = torch.device(self.patcher.load_device)
        self.lora_modules.to(self.device)
        self._exit = ExitStack()  # last: nothing below may fail and leave the shared UNet patched
        if gradient_checkpointing:
            self._exit.enter_context(checkpointed(outermost_blocks(base.diffusion_model)))

    def __enter__(self) -> "ComfyBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Give the shared UNet its own forwards back."""
        self._exit.close()

    # -- plumbing -------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self.lora_modules

    def _ensure_loaded(self) -> None:
        self.mm.load_models_gpu([self.patcher], force_full_load=True)

    def _sigma(self, timesteps: Tensor) -> Tensor:
        """ComfyUI's sigma of a trainer timestep (k-diffusion sigma, or the flow model's s)."""
        if self.discrete:
            return self._sigmas.to(timesteps.device)[timesteps.long()]
        return self.schedule.sigma(timesteps)

    @staticmethod
    def _view(x: Tensor, like: Tensor) -> Tensor:
        return x.view(-1, *[1] * (like.dim() - 1)).to(like.device, like.dtype)

    # -- encoding (no grad) -------------------------------------------------------------------------
    def _check_cancel(self) -> None:
        """Cancel during the (possibly long) encoding of the dataset, before the first step: stop right away."""
        if self.cancel_while_encoding:
            from .comfy_env import throw_if_interrupted

            throw_if_interrupted()

    def release_encoders(self) -> None:
        """Nothing to do: ComfyUI's model management already moved CLIP and the VAE off the GPU when it
        loaded the UNet for training."""

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        self._check_cancel()
        if self.clip is None:
            raise ValueError("the CLIP input is empty: connect the checkpoint's CLIP to encode prompts")
        embeds, pooled = [], []
        for prompt in prompts:
            out = self.clip.encode_from_tokens(self.clip.tokenize(prompt), return_pooled=True, return_dict=True)
            cond = out["cond"].float().clone()
            if cond.shape[1] >= TOKENS:
                cond = cond[:, :TOKENS]
            else:
                cond = torch.cat([cond, cond[:, -1:].expand(-1, TOKENS - cond.shape[1], -1)], dim=1)
            embeds.append(cond.cpu())
            if out.get("pooled_output") is not None:
                pooled.append(out["pooled_output"].float().clone().cpu().reshape(1, -1))
        result = {"prompt_embeds": torch.cat(embeds)}
        if len(pooled) == len(embeds):
            result["pooled"] = torch.cat(pooled)
        return {k: v.to(self.device) for k, v in result.items()}

    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Tensor:
        self._check_cancel()
        if self.vae is None:
            raise ValueError("the VAE input is empty: connect the checkpoint's VAE to encode images")
        images = ((pixels.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu()  # ComfyUI IMAGE: NHWC 0..1
        latents = self.vae.encode(images[..., :3]).float().clone()
        return self.base.process_latent_in(latents.to(self.device)).float()

    # -- forward process ---------------------------------------------------------------------------
    def add_noise(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        return self.schedule.add_noise(latents, noise, timesteps)

    def target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        return self.schedule.target(latents, noise, timesteps, self.prediction_type)

    # -- model calls --------------------------------------------------------------------------------
    def _conds(self, cond: dict[str, Tensor], x: Tensor) -> dict:
        """ComfyUI's per-family conditioning (`extra_conds`), one call per distinct SDXL size row."""
        n = x.shape[0]
        h, w = x.shape[-2] * 8, x.shape[-1] * 8
        embeds = cond["prompt_embeds"]
        pooled = cond.get("pooled")
        time_ids = cond.get("time_ids")
        rows = []
        for i in range(n):
            kw = {"cross_attn": embeds[i:i + 1], "device": x.device, "noise": x[i:i + 1], "width": w, "height": h}
            if pooled is not None:
                kw["pooled_output"] = pooled[i:i + 1]
            if time_ids is not None:
                oh, ow, ct, cl, th, tw = (float(v) for v in time_ids[i].tolist())
                kw.update(height=int(oh), width=int(ow), crop_h=int(ct), crop_w=int(cl), target_height=int(th), target_width=int(tw))
            rows.append(self.base.extra_conds(**kw))
        out = {}
        for key in rows[0]:
            parts = [r[key].process_cond(batch_size=1, device=x.device).cond for r in rows]
            out[key] = torch.cat(parts) if isinstance(parts[0], Tensor) else parts[0]
        return out

    def _x0(self, noisy: Tensor, timesteps: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """Run ComfyUI's model on a DDPM/flow x_t: returns its denoised x0."""
        self._ensure_loaded()
        sigma = self._sigma(timesteps.to(noisy.device)).to(noisy.device)
        s = self._view(sigma, noisy).float()
        x = noisy.float() * (1 + s ** 2).sqrt() if self.discrete else noisy.float()
        kwargs = self._conds(cond, x)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (
            x.device.type == "cuda" and self.base.get_dtype() in (torch.float16, torch.bfloat16)
            and torch.cuda.is_bf16_supported()) else _null()
        with autocast:
            denoised = self.base.apply_model(x, sigma.float(), **kwargs)
        return denoised.float()

    def predict(self, noisy: Tensor, timesteps: Tensor, cond: dict[str, Tensor]) -> Tensor:
        x0 = self._x0(noisy, timesteps, cond)
        return self.schedule.output_from_x0(noisy.float(), x0, timesteps.to(noisy.device), self.prediction_type)

    @contextmanager
    def reference(self) -> Iterator[None]:
        for a in self.adapters.values():
            a.enabled = False
        try:
            yield
        finally:
            for a in self.adapters.values():
                a.enabled = True

    def encoder_features(self, sample: Tensor, timesteps: Tensor, cond: dict[str, Tensor], middle: bool = False) -> Tensor:
        """Frozen pretrained encoder (adapter off): the UNet's input blocks (+ middle block), flattened."""
        unet = self.base.diffusion_model
        blocks = getattr(unet, "input_blocks", None)
        if blocks is None:
            raise ValueError("noise-conditioned features need a UNet with input_blocks (SD1.5/SDXL family)")
        target = unet.middle_block if middle else blocks[-1]
        captured: dict[str, Tensor] = {}

        class _Stop(Exception):
            pass

        def hook(_module, _inputs, output):
            captured["h"] = output
            raise _Stop

        handle = target.register_forward_hook(hook)
        try:
            with self.reference():
                self._x0(sample, timesteps, cond)
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured["h"].float().flatten(1)

    # -- the adapter --------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for a in self.adapters.values() for p in (a.lora_down, a.lora_up)]

    def adapter_state_dict(self) -> dict[str, Tensor]:
        out = {}
        for name, a in self.adapters.items():
            out[f"{name}.lora_down.weight"] = a.lora_down.detach().clone()
            out[f"{name}.lora_up.weight"] = a.lora_up.detach().clone()
        return out

    def load_adapter_state_dict(self, state: dict[str, Tensor]) -> None:
        expected = self.adapter_state_dict()
        if set(state) != set(expected):
            missing, extra = sorted(set(expected) - set(state))[:3], sorted(set(state) - set(expected))[:3]
            raise ValueError(f"adapter does not match this model (rank/targets differ): missing {missing}, unexpected {extra}")
        with torch.no_grad():
            for name, a in self.adapters.items():
                for part in ("lora_down", "lora_up"):
                    value = state[f"{name}.{part}.weight"]
                    param = getattr(a, part)
                    if value.shape != param.shape:
                        raise ValueError(f"adapter weight {name}.{part}: shape {tuple(value.shape)} != {tuple(param.shape)}")
                    param.copy_(value)

    def export_lora(self) -> dict[str, Tensor]:
        out = {}
        for name, a in self.adapters.items():
            key = kohya_name(name)
            down, up = a.lora_down.detach().float().cpu(), a.lora_up.detach().float().cpu()
            if len(a.shape) > 2:  # conv: kohya keeps conv shapes
                down = down.reshape(a.rank, *a.shape[1:])
                up = up.reshape(a.shape[0], a.rank, *[1] * (len(a.shape) - 2))
            out[f"{key}.lora_down.weight"] = down.contiguous()
            out[f"{key}.lora_up.weight"] = up.contiguous()
            out[f"{key}.alpha"] = torch.tensor(a.alpha)
        return out

    def model_info(self) -> dict[str, str]:
        # cheap fingerprint of UNet, VAE and text encoder (it keys the trainer's latent/text cache):
        # names, shapes and a few values of up to 64 tensors of each
        h = hashlib.sha256()
        parts = [self.base.diffusion_model, getattr(self.vae, "first_stage_model", None),
                 getattr(self.clip, "cond_stage_model", None)]
        for module in parts:
            if not isinstance(module, nn.Module):
                h.update(b"-")
                continue
            sd = module.state_dict()
            keys = sorted(sd)
            for k in keys[:: max(1, len(keys) // 64)]:
                t = sd[k]
                h.update(f"{k}{tuple(t.shape)}".encode())
                h.update(t.detach().flatten()[:16].float().cpu().numpy().tobytes())
        return {"name": self.model_name or type(self.base).__name__, "hash": h.hexdigest()[:16],
                "architecture": architecture_of(self.base), "prediction_type": self.prediction_type}


@contextmanager
def _null():
    yield
