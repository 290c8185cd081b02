"""The diffusers backend: SD1.5/SDXL UNet with a PEFT LoRA; the reference is the same UNet, adapter off."""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Sequence

import torch
from torch import Tensor, nn

from .backend import Cond
from .loading import Components, load_components
from .offload import Offloadable
from .lora import LoraSpec, adapter_disabled, attach_lora, kohya_state_dict, lora_parameters


class DiffusersBackend:
    """Implements `Backend` over diffusers components loaded by `load_components`."""

    def __init__(self, parts: Components, lora: LoraSpec, device: torch.device | str = "cpu",
                 weight_dtype: torch.dtype = torch.float32, gradient_checkpointing: bool = False, seed: int = 0,
                 compile: bool = False) -> None:
        self.parts = parts
        self.lora = lora
        self.device = torch.device(device)
        self.scheduler = parts.scheduler
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"scheduler prediction_type {self.prediction_type!r} is not supported (epsilon, v_prediction)")
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device)
        attach_lora(parts.unet, lora, seed)
        parts.unet.to(self.device)
        for name, param in parts.unet.named_parameters():  # frozen base in weight dtype, adapter in fp32
            if not param.requires_grad:
                param.data = param.data.to(weight_dtype)
        if gradient_checkpointing:
            parts.unet.enable_gradient_checkpointing()
        parts.vae.to(self.device)  # fp32: SDXL's VAE overflows in fp16
        for encoder in parts.text_encoders:
            encoder.to(self.device, weight_dtype)
        self.weight_dtype = weight_dtype
        self.encoders = Offloadable([parts.vae, *parts.text_encoders], self.device)
        # the compiled module shares parameters and LoRA layers with the plain one (switching the adapter off
        # for the reference gives a second graph); `encoder_features` and exports use the plain module
        self._forward = torch.compile(parts.unet) if compile else parts.unet

    @classmethod
    def load(cls, model: str, lora: LoraSpec, vae: str | None = None, model_config: str | None = None,
             **kwargs) -> "DiffusersBackend":
        return cls(load_components(model, vae, model_config=model_config), lora, **kwargs)

    @property
    def model(self) -> nn.Module:
        return self.parts.unet

    @property
    def sdxl(self) -> bool:
        return self.parts.architecture == "sdxl"

    # --- encoding (no grad) -------------------------------------------------------------
    def release_encoders(self) -> None:
        """Move the VAE and text encoders to the CPU (on SDXL about 2 GB of GPU memory back for the UNet)."""
        self.encoders.offload()

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        self.encoders.ready()
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.parts.tokenizers, self.parts.text_encoders):
            ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2] if self.sdxl else out.last_hidden_state)
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output  # last encoder's
        return {"prompt_embeds": torch.cat(hidden, dim=-1).float(), "pooled": pooled.float()}

    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Tensor:
        self.encoders.ready()
        vae = self.parts.vae
        latents = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.mean  # deterministic: caches reproduce
        return (latents * vae.config.scaling_factor).float()

    # --- forward process ------------------------------------------------------------------
    def add_noise(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        a = self._alpha_bar(timesteps, latents)
        return a.sqrt() * latents + (1 - a).sqrt() * noise

    def target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        if self.prediction_type == "epsilon":
            return noise
        a = self._alpha_bar(timesteps, latents)
        return a.sqrt() * noise - (1 - a).sqrt() * latents

    def _alpha_bar(self, timesteps: Tensor, like: Tensor) -> Tensor:
        return self.alphas_cumprod[timesteps].view(-1, *[1] * (like.dim() - 1)).to(like.dtype)

    # --- model calls ----------------------------------------------------------------------
    def _unet_kwargs(self, cond: Cond) -> dict:
        kwargs = {"encoder_hidden_states": cond["prompt_embeds"].to(self.weight_dtype)}
        if self.sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": cond["pooled"].to(self.weight_dtype),
                                           "time_ids": cond["time_ids"].to(self.weight_dtype)}
        return kwargs

    def predict(self, noisy: Tensor, timesteps: Tensor, cond: Cond) -> Tensor:
        return self._forward(noisy.to(self.weight_dtype), timesteps, **self._unet_kwargs(cond)).sample.float()

    def reference(self) -> AbstractContextManager[None]:
        return adapter_disabled(self.model)

    def encoder_features(self, sample: Tensor, timesteps: Tensor, cond: Cond, middle: bool = False) -> Tensor:
        """Pretrained encoder (adapter off): time embedding, conv_in, down blocks (+ mid block), flattened."""
        unet = self.model
        with adapter_disabled(unet):
            kwargs = self._unet_kwargs(cond)
            emb = unet.time_embedding(unet.time_proj(timesteps).to(self.weight_dtype))
            if self.sdxl:
                emb = emb + self._added_embedding(kwargs["added_cond_kwargs"])
            h = unet.conv_in(sample.to(self.weight_dtype))
            for block in unet.down_blocks:
                if getattr(block, "has_cross_attention", False):
                    h, _ = block(h, emb, encoder_hidden_states=kwargs["encoder_hidden_states"])
                else:
                    h, _ = block(h, emb)
            if middle:
                h = unet.mid_block(h, emb, encoder_hidden_states=kwargs["encoder_hidden_states"])
        return h.float().flatten(1)

    def _added_embedding(self, added: dict[str, Tensor]) -> Tensor:
        unet = self.model
        time_embeds = unet.add_time_proj(added["time_ids"].flatten()).reshape(added["time_ids"].shape[0], -1)
        return unet.add_embedding(torch.cat([added["text_embeds"], time_embeds.to(added["text_embeds"].dtype)], dim=-1))

    # --- the adapter -------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(lora_parameters(self.model).values())

    def adapter_state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in lora_parameters(self.model).items()}

    def load_adapter_state_dict(self, state: dict[str, Tensor]) -> None:
        params = lora_parameters(self.model)
        if set(state) != set(params):
            missing, extra = sorted(set(params) - set(state))[:3], sorted(set(state) - set(params))[:3]
            raise ValueError(f"adapter does not match this model (rank/targets differ): missing {missing}, unexpected {extra}")
        with torch.no_grad():
            for name, param in params.items():
                if state[name].shape != param.shape:
                    raise ValueError(f"adapter weight {name}: shape {tuple(state[name].shape)} != {tuple(param.shape)}")
                param.copy_(state[name])

    def export_lora(self) -> dict[str, Tensor]:
        return kohya_state_dict(self.model, self.lora.alpha)

    def model_info(self) -> dict[str, str]:
        return {"name": self.parts.name, "hash": self.parts.hash, "architecture": self.parts.architecture,
                "prediction_type": self.prediction_type}

