"""CLIP judges: a PickScore-style preference score and a zero-shot style verdict.

Both load any CLIP model folder or hub id through `ClipEmbedder` (a folder loads offline). PickScore v1
(``yuvalkirstain/PickScore_v1``, a fine-tuned CLIP-H) and plain CLIP (``openai/clip-vit-large-patch14``)
are both CLIP models, so either is a `ClipScorer`.
"""
from __future__ import annotations

from functools import cached_property
from typing import Sequence

import torch
from PIL import Image

from .base import Scorer, pixels, weights_fingerprint

STYLE_TEMPLATE = "a {} image"


class ClipModel:
    """A loaded CLIP with batched, unit-norm text and image embeddings. `label` names it in scorer names
    (default: `location`; ComfyUI passes the name inside its models folder, not the server's path); `option`
    names where the location came from in error messages."""

    def __init__(self, location: str, batch_size: int = 64, label: str | None = None,
                 option: str = "--scorer-model") -> None:
        from ..models.embedder import ClipEmbedder
        from ..models.loading import check_model_source

        check_model_source(location, option)  # a typo or an offline hub id: said before any download
        try:
            self.embedder = ClipEmbedder(location)
        except ValueError as e:  # the embedder names its training option ("config key 'embedder'"): name ours
            raise ValueError(f"{option}: {' '.join(str(e).split(': ', 1)[-1].split())}") from None
        self.location, self.batch_size, self.label = location, batch_size, label or location
        self.fingerprint = weights_fingerprint(self.embedder.model)

    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        step = self.batch_size
        return torch.cat([self.embedder.images(pixels(images[i:i + step])) for i in range(0, len(images), step)])

    def texts(self, prompts: Sequence[str]) -> torch.Tensor:
        step = self.batch_size
        return torch.cat([self.embedder.text(prompts[i:i + step]) for i in range(0, len(prompts), step)])

    @property
    def logit_scale(self) -> float:
        return float(self.embedder.model.logit_scale.exp())


class ClipScorer(Scorer):
    """PickScore / HPS-style preference: logit_scale * cos(text embedding, image embedding).

    Exactly PickScore's score (Kirstain et al. 2023, the PickScore README's inference snippet:
    ``model.logit_scale.exp() * text_embs @ image_embs.T`` on unit-norm embeddings).
    """

    def __init__(self, location: str | ClipModel) -> None:
        self.clip = location if isinstance(location, ClipModel) else ClipModel(location)
        self.name = f"clip:{self.clip.label}"
        self.fingerprint = self.clip.fingerprint

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        text, image = self.clip.texts(prompts), self.clip.images(images)
        return (self.clip.logit_scale * (text * image).sum(-1)).tolist()


class StyleJudge(Scorer):
    """1.0 when CLIP zero-shot classification puts the image in `style`: "a {style} image" has the highest
    cosine among the style and its alternatives (Diffusion-RPO's style-alignment metric, with a fixed judge)."""

    binary = True

    def __init__(self, style: str, clip: str | ClipModel, alternatives: Sequence[str]) -> None:
        self.clip = clip if isinstance(clip, ClipModel) else ClipModel(clip)
        self.labels = [style, *[a for a in alternatives if a != style]]
        if len(self.labels) < 2:
            raise ValueError("style scoring with CLIP needs at least one alternative style")
        self.name = f"style:{style}@{self.clip.label}"
        self.fingerprint = self.clip.fingerprint

    @cached_property
    def label_embeddings(self) -> torch.Tensor:
        """The text embeddings of "a {style} image" for the style and each alternative: fixed, encoded once."""
        return self.clip.texts([STYLE_TEMPLATE.format(s) for s in self.labels])

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        best = (self.clip.images(images) @ self.label_embeddings.T).argmax(-1)
        return [float(i == 0) for i in best.tolist()]
