"""What every diffusers backend shares: a PEFT LoRA on the denoiser (UNet or transformer) whose reference is
the same network with the adapter off, the family's forward process, the VAE, and the adapter's files.

A family subclass (`unet_backend`, `sd3_backend`, `flux_backend`) adds how prompts are encoded and how
its denoiser is called.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Sequence

import torch
from torch import Tensor, nn

from ..forward_process import PREDICTION_TYPES, Schedule, TimestepSampling
from .backend import Cond
from .loading import Components
from .lora import LoraSpec, adapter_disabled, attach_lora, export_state_dict, lora_parameters
from .offload import Offloadable


class DiffusersBackend:
    """Implements `Backend` over diffusers components loaded by `load_components`; subclasses per family."""

    #: every diffusers family here (SD1.5, SDXL, SD3, Flux) has a pooled CLIP text vector
    embeddings = frozenset({"prompt"})
    #: timestep sampling the family trains with when the config leaves it to the family (see forward_process)
    default_timestep_sampling = "uniform"

    def __init__(self, parts: Components, lora: LoraSpec, device: torch.device | str = "cpu",
                 weight_dtype: torch.dtype = torch.float32, gradient_checkpointing: bool = False, seed: int = 0,
                 compile: bool = False, timestep_sampling: TimestepSampling | None = None) -> None:
        self.parts = parts
        self.lora = lora
        self.device = torch.device(device)
        self.schedule = Schedule.from_scheduler(parts.scheduler).to(self.device)
        self.num_train_timesteps = self.schedule.num_train_timesteps
        self.prediction_type = "flow" if self.schedule.flow else parts.scheduler.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type {self.prediction_type!r} is not supported (epsilon, v_prediction)")
        self.alphas_cumprod = self.schedule.alphas_cumprod  # None for flow
        self.timestep_sampling = timestep_sampling or TimestepSampling(self.num_train_timesteps,
                                                                       self.default_timestep_sampling)
        denoiser = parts.denoiser
        attach_lora(denoiser, lora, seed)
        if not parts.quantized:  # a quantised base was placed on the device by its loader, in its own formats
            denoiser.to(self.device)
            for param in denoiser.parameters():  # frozen base in weight dtype, adapter in fp32
                if not param.requires_grad:
                    param.data = param.data.to(weight_dtype)
        if gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        parts.vae.to(self.device)  # fp32: SDXL's VAE overflows in fp16
        for encoder in parts.text_encoders:
            encoder.to(self.device, weight_dtype)
        self.weight_dtype = weight_dtype
        self.encoders = Offloadable([parts.vae, *parts.text_encoders], self.device)
        # the compiled module shares parameters and LoRA layers with the plain one (switching the adapter off
        # for the reference gives a second graph); feature extraction and exports use the plain module
        self._forward = torch.compile(denoiser) if compile else denoiser

    @property
    def model(self) -> nn.Module:
        return self.parts.denoiser

    # --- encoding (no grad) -------------------------------------------------------------
    def release_encoders(self) -> None:
        """Move the VAE and text encoders to the CPU (SDXL: ~2 GB of GPU memory back; Flux/SD3 with T5: ~10 GB)."""
        self.encoders.offload()

    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        raise NotImplementedError

    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Tensor:
        """Latents as the family's pipeline scales them: (z - shift_factor) * scaling_factor (no shift for SD1.5/SDXL)."""
        self.encoders.ready()
        vae = self.parts.vae
        latents = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.mean  # deterministic: caches reproduce
        shift = getattr(vae.config, "shift_factor", None)
        if shift is not None:
            latents = latents - shift
        return (latents * vae.config.scaling_factor).float()

    def token_ids(self, tokenizer, prompts: Sequence[str], length: int) -> Tensor:
        return tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)

    # --- forward process ------------------------------------------------------------------
    def add_noise(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        return self.schedule.add_noise(latents, noise, timesteps)

    def target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        return self.schedule.target(latents, noise, timesteps, self.prediction_type)

    # --- model calls ----------------------------------------------------------------------
    def predict(self, noisy: Tensor, timesteps: Tensor, cond: Cond) -> Tensor:
        raise NotImplementedError

    def reference(self) -> AbstractContextManager[None]:
        return adapter_disabled(self.model)

    def encoder_features(self, sample: Tensor, timesteps: Tensor, cond: Cond) -> Tensor:
        raise ValueError(f"noise-conditioned features need a UNet encoder (SD1.5/SDXL); this is {self.parts.architecture}")

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
        return export_state_dict(self.model, self.lora, self.parts.architecture)

    def model_info(self) -> dict[str, str]:
        return {"name": self.parts.name, "hash": self.parts.hash, "architecture": self.parts.architecture,
                "prediction_type": self.prediction_type}
