"""CLIP text and image embeddings for methods that weigh pairs by similarity (Diffusion-RPO).

Loaded from a folder or hub id (`--embedder`); without one, the pipeline's own pooled text
embedding stands in for the prompt embedding. Images arrive as the trainer's pixels in [-1, 1] and
are resized and normalised the way CLIP was trained (no torchvision needed).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..fingerprint import file_fingerprint
from .offload import Offloadable

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipEmbedder:
    def __init__(self, location: str, device: torch.device | str = "cpu") -> None:
        from transformers import AutoTokenizer, CLIPModel

        try:
            self.model = CLIPModel.from_pretrained(location).to(device).eval().requires_grad_(False)
            self.tokenizer = AutoTokenizer.from_pretrained(location)
        except OSError as e:
            raise ValueError(f"config key 'embedder': cannot load a CLIP model from {location!r}: {e}") from None
        self.device = torch.device(device)
        self.size = self.model.config.vision_config.image_size
        self.placement = Offloadable([self.model], self.device)

    @torch.no_grad()
    def text(self, prompts: Sequence[str]) -> Tensor:
        self.placement.ready()
        ids = self.tokenizer(list(prompts), padding="max_length", truncation=True, return_tensors="pt",
                             max_length=self.tokenizer.model_max_length)
        out = self.model.get_text_features(input_ids=ids.input_ids.to(self.device),
                                           attention_mask=ids.attention_mask.to(self.device))
        return F.normalize(_features(out).float(), dim=-1).cpu()

    @torch.no_grad()
    def images(self, pixels: Tensor) -> Tensor:
        """Pixels [N, 3, H, W] in [-1, 1] -> unit-norm image embeddings [N, D]."""
        self.placement.ready()
        x = F.interpolate((pixels.float() + 1) / 2, size=(self.size, self.size), mode="bicubic", align_corners=False)
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        out = self.model.get_image_features(pixel_values=((x.clamp(0, 1) - mean) / std).to(self.device))
        return F.normalize(_features(out).float(), dim=-1).cpu()


def _features(out) -> Tensor:
    """transformers returns a tensor, or (in newer versions) an output object holding the projection."""
    if isinstance(out, Tensor):
        return out
    return out.pooler_output


class EmbeddingBackend:
    """A backend whose encodings also carry CLIP embeddings: `embed_text` per prompt and `embed_image`
    per image (cached with the latents). Everything else is the wrapped backend's."""

    def __init__(self, backend, location: str) -> None:
        self._backend = backend
        self.embedder = ClipEmbedder(location, backend.device)
        own = getattr(backend, "cache_tag", None)  # e.g. SD3 without T5: its encodings are another entry
        self.cache_tag = "|".join(filter(None, [own, f"embedder={file_fingerprint(location)}"]))

    def __getattr__(self, name: str):
        return getattr(self._backend, name)

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        cond = self._backend.encode_prompts(prompts)
        cond["embed_text"] = self.embedder.text(prompts).to(cond["prompt_embeds"].device)
        return cond

    def release_encoders(self) -> None:
        self._backend.release_encoders()
        self.embedder.placement.offload()

    def encode_image_features(self, pixels: Tensor) -> dict[str, Tensor]:
        return {"embed_image": self.embedder.images(pixels)}
