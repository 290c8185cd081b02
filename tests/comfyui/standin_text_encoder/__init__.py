"""A test-only ComfyUI node: a small stand-in for Flux's text encoder, for the integration test on a tiny Flux.

ComfyUI 0.3.64 builds Flux's text encoder as CLIP-L + T5-XXL at full size (~4.9B parameters), which a 2-core CPU
test cannot run. This node gives a real `comfy.sd.CLIP` with ComfyUI's own Flux tokenizer (CLIP-L and T5 token ids,
T5's 256-token minimum lowered through ComfyUI's `tokenizer_data` so the test stays small) and a small random
encoder with the outputs of Flux's: per T5 token a 4096-wide vector, and a 768-wide pooled vector from the CLIP-L
tokens. Everything that uses the conditioning (CLIPTextEncode, FluxGuidance, the samplers, the Train node) is
ComfyUI's and the pack's real code. Never shipped: it lives in tests/ and only the test's ComfyUI loads it.
"""
from __future__ import annotations

import torch

import comfy.sd
import comfy.supported_models_base
from comfy.text_encoders.flux import FluxTokenizer

T5_VOCAB, CLIP_VOCAB, WIDTH = 32128, 49408, 16


class StandInFluxEncoder(torch.nn.Module):
    def __init__(self, device="cpu", dtype=None, model_options={}):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.t5 = torch.nn.Embedding(T5_VOCAB, WIDTH, _weight=torch.randn(T5_VOCAB, WIDTH, generator=g))
        self.clip = torch.nn.Embedding(CLIP_VOCAB, WIDTH, _weight=torch.randn(CLIP_VOCAB, WIDTH, generator=g))
        self.to_t5 = torch.nn.Linear(WIDTH, 4096)
        self.to_pooled = torch.nn.Linear(WIDTH, 768)
        with torch.no_grad():
            for layer in (self.to_t5, self.to_pooled):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.3)
                layer.bias.zero_()
        self.dtypes = {torch.float32}

    @staticmethod
    def _ids(chunks) -> torch.Tensor:
        return torch.tensor([t[0] for chunk in chunks for t in chunk if isinstance(t[0], int)])

    def encode_token_weights(self, token_weight_pairs):
        device = self.to_t5.weight.device
        cond = self.to_t5(self.t5(self._ids(token_weight_pairs["t5xxl"]).to(device)))[None]
        pooled = self.to_pooled(self.clip(self._ids(token_weight_pairs["l"]).to(device)).mean(0, keepdim=True))
        return cond.float(), pooled.float(), {}

    def reset_clip_options(self):
        pass

    def set_clip_options(self, options):
        pass

    def load_sd(self, sd):
        return self.load_state_dict(sd, strict=False)


class StandInFluxTextEncoder:
    CATEGORY = "testing"
    FUNCTION = "load"
    RETURN_TYPES = ("CLIP",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"t5_min_length": ("INT", {"default": 1, "min": 1, "max": 512})}}

    def load(self, t5_min_length):
        target = comfy.supported_models_base.ClipTarget(FluxTokenizer, StandInFluxEncoder)
        return (comfy.sd.CLIP(target, tokenizer_data={"t5xxl_min_length": t5_min_length}),)


NODE_CLASS_MAPPINGS = {"StandInFluxTextEncoder": StandInFluxTextEncoder}
