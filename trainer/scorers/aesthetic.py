"""A LAION-style aesthetic scorer: a linear or MLP head on unit-norm CLIP image embeddings.

The head is read from a **safetensors** file only (nothing is unpickled). Its Linear layers are the
tensor pairs ``<index>.weight`` / ``<index>.bias`` under one prefix (``layers.0.weight`` ... as in LAION's
improved aesthetic predictor), or a bare ``weight`` / ``bias`` (LAION's first, linear predictor), applied in
index order with nothing between them: the improved predictor's ReLUs are commented out and its Dropouts do
nothing at inference (christophschuhmann/improved-aesthetic-predictor, simple_inference.py, class MLP). The
published heads are .pth pickles; convert one yourself, once, with torch's weights-only loader:

    python -c "import torch, safetensors.torch as st; st.save_file({k: v.contiguous() for k, v in torch.load('sac+logos+ava1-l14-linearMSE.pth', map_location='cpu', weights_only=True).items()}, 'aesthetic-l14.safetensors')"

and pair it with the CLIP it was trained on (``openai/clip-vit-large-patch14`` for the ViT-L/14 heads).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from .base import Scorer, weights_fingerprint
from .clip import ClipModel

CONVERSION_HINT = ("convert a .pth head once with torch.load(..., weights_only=True) and safetensors' save_file "
                   "(see the README, 'Scorers')")


def read_head(path: str | Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (weight, bias) of each Linear layer of a head file, in order; shapes must chain down to one output."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"aesthetic head {path}: only .safetensors files are read; {CONVERSION_HINT}")
    if not path.is_file():
        raise ValueError(f"aesthetic head {path}: no such file")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for a bad header
        raise ValueError(f"aesthetic head {path}: not a readable safetensors file ({e})") from None
    if set(tensors) == {"weight", "bias"}:
        layers = [(tensors["weight"], tensors["bias"])]
    else:
        indexed = {}
        for key in tensors:
            m = re.fullmatch(r"(?:.*\.)?(\d+)\.(weight|bias)", key)
            if m is None:
                raise ValueError(f"aesthetic head {path}: unexpected tensor {key!r} (expected <index>.weight/.bias "
                                 "of Linear layers, or weight/bias)")
            indexed.setdefault(int(m.group(1)), {})[m.group(2)] = tensors[key]
        if not indexed or any(set(p) != {"weight", "bias"} for p in indexed.values()):
            raise ValueError(f"aesthetic head {path}: every Linear layer needs a weight and a bias")
        layers = [(indexed[i]["weight"], indexed[i]["bias"]) for i in sorted(indexed)]
    for i, (w, b) in enumerate(layers):
        if w.dim() != 2 or b.shape != (w.shape[0],) or (i and w.shape[1] != layers[i - 1][0].shape[0]):
            raise ValueError(f"aesthetic head {path}: layer {i} has weight {tuple(w.shape)} and bias {tuple(b.shape)}, "
                             "which do not chain")
    if layers[-1][0].shape[0] != 1:
        raise ValueError(f"aesthetic head {path}: the last layer has {layers[-1][0].shape[0]} outputs, expected 1")
    return [(w.float(), b.float()) for w, b in layers]


class AestheticScorer(Scorer):
    """score = head(unit-norm CLIP image embedding); the prompt is not used."""

    def __init__(self, head: str | Path, clip: str | ClipModel) -> None:
        self.layers = read_head(head)
        self.clip = clip if isinstance(clip, ClipModel) else ClipModel(clip)
        width = self.clip.embedder.model.config.projection_dim
        if self.layers[0][0].shape[1] != width:
            raise ValueError(f"aesthetic head {head} takes {self.layers[0][0].shape[1]}-wide embeddings, but "
                             f"{self.clip.label} makes {width}-wide ones: pair the head with the CLIP it was trained on")
        self.name = f"aesthetic:{Path(head).name}@{self.clip.label}"
        self.fingerprint = weights_fingerprint({f"{i}.{k}": t for i, layer in enumerate(self.layers)
                                                for k, t in zip(("weight", "bias"), layer)}, self.clip.embedder.model)

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        x = self.clip.images(images)
        for w, b in self.layers:
            x = x @ w.T + b
        return x[:, 0].tolist()
