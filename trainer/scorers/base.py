"""The scorer interface: images + prompts -> one float per image, with a name and a fingerprint of the weights.

A scorer judges images without ComfyUI. `name` says what it is (``clip:yuvalkirstain/PickScore_v1``) and
`fingerprint` identifies the weights it ran with (the same weights give the same fingerprint wherever they
were loaded from); both go into every file a scorer labels, so an evaluation can tell whether a judge is
the one that made the training pairs.

`judge` turns the scores of the images of one prompt into preferences: a single scorer prefers the image
it scores higher; an ensemble (`ensemble.Ensemble`) prefers one only when its members agree.
"""
from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image


class Scorer(ABC):
    name: str
    fingerprint: str
    binary: bool = False  # scores are 0/1 verdicts: rates are reported, not means

    @abstractmethod
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        """One score per image, `prompts[i]` being the prompt of `images[i]`; higher is better."""

    def judge(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> "Judgement":
        scores = self.score(images, prompts)
        return Judgement(scores, [scores], [self.name])

    def identities(self) -> list[dict[str, str]]:
        """Name and fingerprint of this scorer and, for an ensemble, of each member (what labelled a file)."""
        return [{"name": self.name, "fingerprint": self.fingerprint}]


@dataclass
class Judgement:
    """Scores of some images and which of them is preferred to which.

    `combined` is the score pairing uses (its margin is in these units); `columns` holds each member
    scorer's own scores (one column for a single scorer). `vote` is None for a single scorer, which
    prefers a to b when a scores strictly higher; an ensemble's vote rule is in `ensemble.prefers`.
    """

    combined: list[float]
    columns: list[list[float]]
    names: list[str]
    vote: str | None = None

    def prefers(self, a: int, b: int) -> bool:
        if self.vote is None:
            return self.combined[a] > self.combined[b]
        from .ensemble import prefers

        return prefers(self.vote, [column[a] for column in self.columns], [column[b] for column in self.columns])

    def keeps(self, a: int, b: int, margin: float = 0.0) -> bool:
        """Whether pairing keeps a (chosen) against b (rejected): the judge prefers a, and the combined scores
        differ by at least `margin`."""
        return self.prefers(a, b) and self.combined[a] - self.combined[b] >= margin


def pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images -> float [N, 3, H, W] in [-1, 1] (what `ClipEmbedder.images` takes)."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


def weights_fingerprint(*modules: torch.nn.Module | dict[str, torch.Tensor]) -> str:
    """A fingerprint of weights as loaded: name, shape and the first 64k values of every tensor.

    It does not depend on where the weights came from (folder, hub cache, a copy elsewhere), and it
    costs a fraction of a second even for a ViT-H CLIP.
    """
    digest = hashlib.sha256()
    for module in modules:
        tensors = module.state_dict() if isinstance(module, torch.nn.Module) else module
        for name in sorted(tensors):
            t = tensors[name].detach()
            digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            digest.update(t.flatten()[:65536].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def text_fingerprint(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
