"""The records that flow from a data source to the trainer."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

#: An image as stored by a source: encoded bytes (parquet, HF) or a file path (folders).
ImageSource = bytes | Path


@dataclass(frozen=True)
class PreferenceExample:
    """One row of preference data.

    A pair has two images, chosen first (labels (1.0, 0.0)); an unpaired row (KTO-style
    like/dislike) has one image with label 1.0 (desirable) or 0.0 (undesirable).
    `source` names the file and row for error messages, e.g. "data/train-0.parquet row 17".
    """

    prompt: str
    images: tuple[ImageSource, ...]
    labels: tuple[float, ...]
    source: str

    @property
    def is_pair(self) -> bool:
        return len(self.images) == 2

    def image_where(self, k: int) -> str:
        """Where image k is, for messages: "data/pairs.jsonl line 3 (rejected image)"."""
        return f"{self.source} ({('chosen', 'rejected')[k] if self.is_pair else 'image'} image)"


@dataclass
class ProcessedExample:
    """A row after decoding and the shared resize/crop/flip: K images (K = 2 for a pair)."""

    prompt: str
    pixels: Tensor  # [K, 3, H, W] float in [-1, 1]
    time_ids: Tensor  # [K, 6] SDXL micro-conditioning: original (h, w), crop (top, left), target (h, w)
    labels: Tensor  # [K]
    source: str


@dataclass
class TrainBatch:
    """What the loop consumes: N images chosen-first (pairs: rows 0..B-1 chosen, B..2B-1 rejected)."""

    latents: Tensor  # [N, C, h, w], already scaled for the model
    cond: dict[str, Tensor]  # batch-first conditioning, one row per image
    labels: Tensor  # [N]
    prompts: list[str]  # one per image
    paired: bool

    def to(self, device: torch.device | str) -> "TrainBatch":
        return TrainBatch(
            self.latents.to(device),
            {k: v.to(device) for k, v in self.cond.items()},
            self.labels.to(device),
            self.prompts,
            self.paired,
        )
