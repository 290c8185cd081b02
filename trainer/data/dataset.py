"""Map-style access: the dataset of processed rows, the batch collate and the resumable sampler."""
from __future__ import annotations

import random
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .errors import BadImageError, DataError
from .grouping import related_groups, related_order
from .records import PreferenceExample, ProcessedExample
from .transforms import ImageTransform

Key = tuple[int, bool]


class PreferenceDataset(Dataset):
    """Rows of a map-style source (or any sequence of examples), decoded and transformed;
    indexed by (row, flip).

    A random crop is seeded by (seed, row, flip), so a key always gives the same pixels (a
    cache can store both flip variants of a row). With `skip_bad_rows` a row whose image does
    not decode gives None, which `collate` drops and counts.
    """

    def __init__(self, source: Sequence[PreferenceExample], transform: ImageTransform, seed: int, skip_bad_rows: bool = False):
        self.source = source
        self.transform = transform
        self.seed = seed
        self.skip_bad_rows = skip_bad_rows

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: Key) -> ProcessedExample | None:
        row, flip = key
        crop_rng = random.Random(f"{self.seed}/{row}/{int(flip)}")
        try:
            return self.transform(self.source[row], bool(flip), crop_rng)
        except BadImageError:
            if self.skip_bad_rows:
                return None
            raise


def collate(items: Sequence[ProcessedExample | None]) -> dict[str, Any]:
    """Stack processed rows: prompts, pixels [B, K, 3, H, W], time_ids [B, K, 6], labels [B, K],
    sources, and `skipped` (rows dropped as None). If every row was skipped, prompts is empty."""
    kept = [x for x in items if x is not None]
    sizes = {x.pixels.shape[0] for x in kept}
    if len(sizes) > 1:
        raise DataError(f"a batch mixes pairs and unpaired rows ({', '.join(x.source for x in kept)})")
    if not kept:
        return {"prompts": [], "pixels": torch.empty(0), "time_ids": torch.empty(0), "labels": torch.empty(0),
                "sources": [], "skipped": len(items)}
    return {
        "prompts": [x.prompt for x in kept],
        "pixels": torch.stack([x.pixels for x in kept]),
        "time_ids": torch.stack([x.time_ids for x in kept]),
        "labels": torch.stack([x.labels for x in kept]),
        "sources": [x.source for x in kept],
        "skipped": len(items) - len(kept),
    }


class ResumableSampler(Sampler[Key]):
    """Yields (row, flip) forever, epoch after epoch, each epoch a seeded permutation.

    `related_prompts` orders rows so that each chunk of `group_size` consecutive rows holds related
    prompts (see grouping.py); set group_size to the global batch size. An epoch is cut into whole
    chunks (a few rows may sit out an epoch, different ones each epoch). Ranks of a distributed run
    all draw the same keys and each keeps its slice of every global batch (see loader.py). The
    position is (epoch, index) and `load_state_dict` jumps straight to it.
    """

    def __init__(
        self,
        num_rows: int,
        seed: int,
        random_flip: bool,
        related_prompts: bool = False,
        *,
        prompts: Sequence[str] | None = None,
        group_size: int = 1,
    ):
        if num_rows < 1:
            raise ValueError(f"num_rows must be at least 1, got {num_rows}")
        if group_size < 1:
            raise ValueError(f"group_size must be at least 1, got {group_size}")
        self.num_rows, self.seed, self.random_flip = num_rows, seed, random_flip
        self.chunk = group_size if related_prompts else 1
        self.groups = None
        if related_prompts:
            if prompts is None or len(prompts) != num_rows:
                raise ValueError("related_prompts needs one prompt per row (prompts=)")
            self.groups = related_groups(prompts, min_size=max(2, group_size))
        self.epoch_length = num_rows // self.chunk * self.chunk
        if self.epoch_length == 0:
            raise ValueError(f"{num_rows} rows are too few for batches of {self.chunk} related prompts")
        self.position = 0
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None

    def epoch_keys(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The rows and flips of one epoch."""
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self.num_rows) if self.groups is None else related_order(*self.groups, self.chunk, rng)
            rows = order[: self.epoch_length]
            flips = rng.random(len(rows)) < 0.5 if self.random_flip else np.zeros(len(rows), dtype=bool)
            self._epoch = (epoch, rows, flips)
        return self._epoch[1], self._epoch[2]

    def __iter__(self) -> Iterator[Key]:
        while True:
            epoch, index = divmod(self.position, self.epoch_length)
            rows, flips = self.epoch_keys(epoch)
            self.position += 1
            yield int(rows[index]), bool(flips[index])

    def state_dict(self) -> dict[str, int]:
        epoch, index = divmod(self.position, self.epoch_length)
        return {"epoch": epoch, "index": index, "seed": self.seed, "num_rows": self.num_rows,
                "epoch_length": self.epoch_length}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "num_rows", "epoch_length"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]} but this run has {getattr(self, key)}: "
                    "the data, seed, batch size or sharding changed since the checkpoint"
                )
        self.position = state["epoch"] * self.epoch_length + state["index"]
