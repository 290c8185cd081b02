"""Flux.1 (dev, schnell): a FluxTransformer2DModel on 2x2-packed latents with RoPE position ids.

As `FluxPipeline` and diffusers' `train_dreambooth_lora_flux.py` do: the pooled CLIP-L output and T5's last
hidden states condition the model; latents [B, C, H, W] are packed to [B, H/2 * W/2, 4C] tokens with image
ids (0, row, column) and zero text ids; the transformer's timestep is s_t (it multiplies by 1000 itself); a
guidance-distilled model (dev: `guidance_embeds`) gets the training `guidance` (the script's
`--guidance_scale`, 3.5), schnell none. The output is unpacked back to the latent layout.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .backend import Cond
from .diffusers_backend import DiffusersBackend

#: T5 tokens per prompt: FluxPipeline's and train_dreambooth_lora_flux.py's `max_sequence_length` default
T5_TOKENS = 512


def pack_latents(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, 4C]: each 2x2 patch one token (FluxPipeline._pack_latents)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """The inverse of `pack_latents` (FluxPipeline._unpack_latents)."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """(0, row, column) of each packed token (FluxPipeline._prepare_latent_image_ids), built on `device`."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device)[None, :]
    return ids.reshape(-1, 3)


class FluxBackend(DiffusersBackend):
    default_timestep_sampling = "uniform"  # train_dreambooth_lora_flux.py's `--weighting_scheme none`

    def __init__(self, *args, guidance: float = 3.5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.guidance = float(guidance)

    @property
    def t5_length(self) -> int:
        return min(T5_TOKENS, self.parts.tokenizers[1].model_max_length)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        self.encoders.ready()
        (clip_tok, t5_tok), (clip, t5) = self.parts.tokenizers, self.parts.text_encoders
        pooled = clip(self.token_ids(clip_tok, prompts, clip_tok.model_max_length)).pooler_output
        embeds = t5(self.token_ids(t5_tok, prompts, self.t5_length))[0]
        return {"prompt_embeds": embeds.float(), "pooled": pooled.float()}

    def predict(self, noisy: Tensor, timesteps: Tensor, cond: Cond) -> Tensor:
        n, _, h, w = noisy.shape
        embeds = cond["prompt_embeds"]
        guidance = None
        if self.model.config.guidance_embeds:
            guidance = torch.full((n,), self.guidance, device=noisy.device, dtype=self.weight_dtype)
        out = self._forward(hidden_states=pack_latents(noisy).to(self.weight_dtype),
                            encoder_hidden_states=embeds.to(self.weight_dtype),
                            pooled_projections=cond["pooled"].to(self.weight_dtype),
                            timestep=self.schedule.sigma(timesteps).to(self.weight_dtype), guidance=guidance,
                            img_ids=image_ids(h, w, noisy.device, self.weight_dtype),
                            txt_ids=embeds.new_zeros(embeds.shape[1], 3).to(self.weight_dtype), return_dict=False)[0]
        return unpack_latents(out.float(), h, w)
