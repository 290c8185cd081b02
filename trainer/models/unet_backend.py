"""SD1.5/SDXL: a UNet2DConditionModel with CLIP text conditioning (SDXL: two encoders, pooled and size ids)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .backend import Cond
from .diffusers_backend import DiffusersBackend
from .lora import adapter_disabled


class UNetBackend(DiffusersBackend):
    @property
    def sdxl(self) -> bool:
        return self.parts.architecture == "sdxl"

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        self.encoders.ready()
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.parts.tokenizers, self.parts.text_encoders):
            out = encoder(self.token_ids(tokenizer, prompts, tokenizer.model_max_length), output_hidden_states=True)
            hidden.append(out.hidden_states[-2] if self.sdxl else out.last_hidden_state)
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output  # last encoder's
        return {"prompt_embeds": torch.cat(hidden, dim=-1).float(), "pooled": pooled.float()}

    def _unet_kwargs(self, cond: Cond) -> dict:
        kwargs = {"encoder_hidden_states": cond["prompt_embeds"].to(self.weight_dtype)}
        if self.sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": cond["pooled"].to(self.weight_dtype),
                                           "time_ids": cond["time_ids"].to(self.weight_dtype)}
        return kwargs

    def predict(self, noisy: Tensor, timesteps: Tensor, cond: Cond) -> Tensor:
        return self._forward(noisy.to(self.weight_dtype), timesteps, **self._unet_kwargs(cond)).sample.float()

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
