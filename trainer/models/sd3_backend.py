"""SD3 / SD3.5: an SD3Transformer2DModel (MMDiT) conditioned on CLIP-L + CLIP-G + T5 (T5 optional).

Conditioning as `StableDiffusion3Pipeline.encode_prompt` builds it: the penultimate hidden states of CLIP-L
and CLIP-G concatenated on the channel axis and zero-padded to T5's width, followed on the sequence axis by
T5's last hidden states (zeros when T5 is dropped, as the pipeline does without `text_encoder_3`); the
pooled vector is CLIP-L's and CLIP-G's projected embeddings concatenated. The cache keeps the CLIP part,
the pooled vector and (unless dropped) T5's states apart, so a dropped T5 costs no disk.
The transformer's timestep is s_t * 1000, the scheduler's `timesteps` entry (diffusers
`train_dreambooth_lora_sd3.py`).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import Cond
from .diffusers_backend import DiffusersBackend

#: T5 tokens per prompt: diffusers' SD3 training scripts' `--max_sequence_length` default
T5_TOKENS = 77


class SD3Backend(DiffusersBackend):
    default_timestep_sampling = "logit_normal"  # train_dreambooth_lora_sd3.py's `--weighting_scheme` default

    @property
    def drop_t5(self) -> bool:
        return len(self.parts.text_encoders) == 2

    @property
    def cache_tag(self) -> str | None:
        """Encodings without T5 are another entry than with it (SD1.5/SDXL keys have no tag)."""
        return "t5=off" if self.drop_t5 else None

    @property
    def t5_length(self) -> int:
        return min(T5_TOKENS, self.parts.tokenizers[2].model_max_length)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        self.encoders.ready()
        hidden, pooled = [], []
        for tokenizer, encoder in zip(self.parts.tokenizers[:2], self.parts.text_encoders[:2]):
            out = encoder(self.token_ids(tokenizer, prompts, tokenizer.model_max_length), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        cond = {"clip_embeds": torch.cat(hidden, dim=-1).float(), "pooled": torch.cat(pooled, dim=-1).float()}
        if not self.drop_t5:
            ids = self.token_ids(self.parts.tokenizers[2], prompts, self.t5_length)
            cond["t5_embeds"] = self.parts.text_encoders[2](ids)[0].float()
        return cond

    def joint_embeds(self, cond: Cond) -> Tensor:
        """CLIP states padded to the joint width, then T5's (or zeros): the transformer's `encoder_hidden_states`."""
        clip = cond["clip_embeds"]
        width = self.model.config.joint_attention_dim
        t5 = cond.get("t5_embeds")
        if t5 is None:
            t5 = clip.new_zeros(clip.shape[0], self.t5_length, width)
        return torch.cat([F.pad(clip, (0, width - clip.shape[-1])), t5], dim=-2)

    def predict(self, noisy: Tensor, timesteps: Tensor, cond: Cond) -> Tensor:
        model_t = self.schedule.sigma(timesteps) * self.num_train_timesteps
        out = self._forward(hidden_states=noisy.to(self.weight_dtype),
                            encoder_hidden_states=self.joint_embeds(cond).to(self.weight_dtype),
                            pooled_projections=cond["pooled"].to(self.weight_dtype),
                            timestep=model_t.to(self.weight_dtype), return_dict=False)[0]
        return out.float()
