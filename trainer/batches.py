"""The stream of training batches: sampler keys -> (cached or freshly encoded) `TrainBatch`es.

Every rank draws the same global batch of keys and keeps its own share, so a run on W processes
with batch B sees exactly the data and noise of one process with batch W*B. The position in the
stream is the sampler's (epoch, index): resuming jumps straight there.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from .config import TrainConfig
from .data.dataset import PreferenceDataset, ResumableSampler, collate
from .data.records import PreferenceExample, TrainBatch
from .data.transforms import ImageTransform
from .distributed import Ranks
from .encoding import EncodingCache, batch_from_cache, encode_collated, entry_key, fill_cache
from .methods import Method
from .models.backend import Backend
from .models.tiny import cache_root


@dataclass
class StreamBatch:
    local: TrainBatch  # this rank's rows, chosen-first
    rows: Tensor  # their indices in the global chosen-first batch
    global_shape: torch.Size  # latents shape of the global batch


class BatchStream:
    def __init__(self, config: TrainConfig, backend: Backend, examples: Sequence[PreferenceExample],
                 method: Method, ranks: Ranks) -> None:
        self.backend, self.ranks = backend, ranks
        self.local_size = config.batch_size
        self.global_size = config.batch_size * ranks.world_size
        self.transform = ImageTransform(config.resolution, config.center_crop)
        self.dataset = PreferenceDataset(examples, self.transform, config.seed)
        related = getattr(method, "wants_related_prompts", False)
        self.sampler = ResumableSampler(len(examples), config.seed, config.random_flip, related,
                                        prompts=[e.prompt for e in examples] if related else None,
                                        group_size=self.global_size)
        self.keys = iter(self.sampler)
        self.cache = None
        if config.cache:
            self.cache = EncodingCache(_cache_folder(config, backend))
            self._fill_cache(config, examples)

    def _fill_cache(self, config: TrainConfig, examples: Sequence[PreferenceExample]) -> None:
        """Encode every (row, flip) the run can draw once; the main process writes, the others read."""
        flips = (False, True) if config.random_flip else (False,)
        setting = f"{self.backend.model_info().get('hash', '')}|{config.resolution}|{config.center_crop}"
        self.entry_keys = {(row, flip): entry_key(examples[row], flip, setting)
                           for row in range(len(examples)) for flip in flips}
        if self.ranks.is_main or self.cache.folder is None:
            missing = [(k, key) for k, key in self.entry_keys.items() if key not in self.cache]
            fill_cache(self.cache, self.backend, ((key, self.dataset[k]) for k, key in missing),
                       batch_size=max(8, self.local_size))
        self.ranks.barrier()
        if not self.ranks.is_main and self.cache.folder is not None:
            self.cache = EncodingCache(self.cache.folder)

    def next_batch(self) -> StreamBatch:
        keys = list(itertools.islice(self.keys, self.global_size))
        mine = keys[self.ranks.rank * self.local_size : (self.ranks.rank + 1) * self.local_size]
        if self.cache is not None:
            local = batch_from_cache(self.cache, [self.entry_keys[k] for k in mine])
        else:
            local = encode_collated(self.backend, collate([self.dataset[k] for k in mine]))
        k = 2 if local.paired else 1
        start = self.ranks.rank * self.local_size
        rows = torch.cat([torch.arange(start, start + self.local_size) + j * self.global_size for j in range(k)])
        return StreamBatch(local, rows, torch.Size((self.global_size * k, *local.latents.shape[1:])))

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Jump straight to the saved position (no image is decoded again)."""
        self.sampler.load_state_dict(state)


def _cache_folder(config: TrainConfig, backend: Backend) -> Path:
    root = Path(config.cache_dir) if config.cache_dir else cache_root() / "encodings"
    return root / backend.model_info().get("hash", "model")
