"""The stream of training batches: the data loader's batches -> (cached or freshly encoded) `TrainBatch`es.

One loader (`data/loader.py`) gives every batch, with its exact position: map-style data is drawn by
its resumable sampler (every rank draws the same global batch of keys and keeps its own share, so a
run on W processes with batch B sees exactly the data and noise of one process with batch W*B), and
streamed data shard by shard. Resuming jumps straight to the saved position.

With the cache on (map-style data), every row is encoded once before training, its images decoded by
a DataLoader with `num_workers` processes; a row whose images do not read or decode is then, with
`skip_bad_rows`, left out of the sampler and counted. Otherwise images are decoded by the loader's
workers (reading ahead, pinned memory on CUDA) and encoded every step; a bad row is dropped from its
batch and counted. Only the VAE / text-encoder calls run in the main process. On CUDA a batch is handed
out already on the device (copied asynchronously from pinned memory).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .config import TrainConfig
from .data.base import DataStats
from .data.dataset import Key, PreferenceDataset, collate
from .data.errors import BadImageError, DataError
from .data.loader import ResumableLoader, make_loader, make_sampler, one_line_errors, row_prompts
from .data.records import PreferenceExample, TrainBatch
from .data.transforms import ImageTransform
from .distributed import Ranks
from .encoding import (EncodingCache, batch_from_cache, cache_setting, encode_batches, encode_collated,
                       entry_keys_by_flip)
from .methods import Method
from .models.backend import Backend
from .models.tiny import cache_root

#: Images per VAE call when filling the cache, at 512 px (scaled by area for other resolutions).
ENCODE_IMAGES_AT_512 = 16
MAX_ROWS_PER_CALL = 16


class StreamBatch:
    """This rank's rows of one global batch: `local` chosen-first, `rows` their indices in the global
    chosen-first batch, `global_shape` the latents shape of the global batch (for the shared noise)."""

    def __init__(self, local: TrainBatch, rank: int, local_size: int, world_size: int) -> None:
        k = 2 if local.paired else 1
        b = local.latents.shape[0] // k  # fewer than local_size when bad rows were dropped from the batch
        start, global_size = rank * local_size, local_size * world_size
        self.local = local
        self.rows = torch.cat([torch.arange(start, start + b) + j * global_size for j in range(k)])
        self.global_shape = torch.Size((global_size * k, *local.latents.shape[1:]))


class _CachedRows(Dataset):
    """Sampler keys (index among the readable rows, flip) -> cache entry keys."""

    def __init__(self, entry_keys: dict[Key, str], rows: list[int]) -> None:
        self.entry_keys, self.rows = entry_keys, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: Key) -> str:
        return self.entry_keys[(self.rows[key[0]], key[1])]


def _cached_batch(cache: EncodingCache, keys: list[str]) -> dict:
    return {"batch": batch_from_cache(cache, keys)}


class _Keyed(Dataset):
    """(row, flip) -> ((row, flip), the processed row or None when it was skipped as bad)."""

    def __init__(self, dataset: PreferenceDataset) -> None:
        self.dataset = dataset

    def __getitem__(self, key: Key):
        return key, self.dataset[key]


def _collate_keyed(items: list) -> tuple[list[Key], dict]:
    kept = [(key, x) for key, x in items if x is not None]
    return [key for key, _ in kept], collate([x for _, x in kept])


class BatchStream:
    def __init__(self, config: TrainConfig, backend: Backend, examples: Sequence[PreferenceExample],
                 method: Method, ranks: Ranks) -> None:
        self.backend, self.ranks, self.local_size = backend, ranks, config.batch_size
        self.device = torch.device(backend.device)
        pin = self.device.type == "cuda"
        transform = ImageTransform(config.resolution, config.center_crop, config.max_pixels, config.max_image_bytes)
        related = getattr(method, "wants_related_prompts", False)
        map_style = not config.streaming and hasattr(examples, "__getitem__")
        if related and not map_style:
            raise ValueError(f"method {method.name!r} groups related prompts in a batch, which needs random "
                             "access to every prompt: use a local dataset without --streaming")
        self.cache: EncodingCache | None = None
        if map_style and config.cache:
            self.cache = EncodingCache(_cache_folder(config, backend))
            entry_keys, rows = self._fill_cache(config, examples, transform)
            prompts = row_prompts(examples) if related else None
            sampler = make_sampler(len(rows), config.seed, config.random_flip, self.local_size * ranks.world_size,
                                   [prompts[r] for r in rows] if prompts is not None else None)
            self.loader = ResumableLoader(_CachedRows(entry_keys, rows), batch_size=self.local_size, sampler=sampler,
                                          stats=getattr(examples, "stats", None), rank=ranks.rank,
                                          world_size=ranks.world_size,
                                          collate_fn=functools.partial(_cached_batch, self.cache))
            self.loader.stats.bad_rows_skipped += len(examples) - len(rows)
        else:
            self.loader = make_loader(examples, transform, seed=config.seed, batch_size=self.local_size,
                                      num_workers=config.num_workers, random_flip=config.random_flip,
                                      related_prompts=related, streaming=not map_style,
                                      skip_bad_rows=config.skip_bad_rows, rank=ranks.rank, world_size=ranks.world_size,
                                      pin_memory=pin)
        self._batches: Iterator[dict] | None = None

    @property
    def stats(self) -> DataStats:
        """Rows read, ties dropped and bad rows skipped so far."""
        return self.loader.stats

    # --- the cache ---------------------------------------------------------------------------------
    def _fill_cache(self, config: TrainConfig, examples: Sequence[PreferenceExample],
                    transform: ImageTransform) -> tuple[dict[Key, str], list[int]]:
        """Encode every (row, flip) the run can draw once; return the entry keys and the rows every
        rank trains on. With a cache folder the ranks split the missing rows and each writes its own
        shards; without one every rank encodes all of them. A bad row (skip_bad_rows) is one whose
        entries are not in the cache afterwards, which every rank sees alike."""
        flips = (False, True) if config.random_flip else (False,)
        setting = cache_setting(self.backend, config.resolution, config.center_crop, config.seed, config.vae)
        entry_keys: dict[Key, str] = {}
        for row in range(len(examples)):
            try:
                keys = entry_keys_by_flip(examples[row], flips, setting)
                entry_keys.update({(row, flip): key for flip, key in keys.items()})
            except BadImageError:  # an image file that does not read
                if not config.skip_bad_rows:
                    raise
        shared = self.cache.folder is not None
        missing, seen = [], set()
        for k, key in entry_keys.items():
            if key not in self.cache and key not in seen:  # identical rows are encoded once
                seen.add(key)
                missing.append(k)
        if shared and self.ranks.world_size > 1:
            self.ranks.barrier()  # every rank has listed the cache before any rank adds a shard to it
            missing = missing[self.ranks.rank :: self.ranks.world_size]
        if missing:
            images = ENCODE_IMAGES_AT_512 * 512 * 512 // config.resolution ** 2
            per_call = max(1, min(MAX_ROWS_PER_CALL, images // len(examples[0].images)))
            chunks = [missing[i : i + per_call] for i in range(0, len(missing), per_call)]
            dataset = _Keyed(PreferenceDataset(examples, transform, config.seed, config.skip_bad_rows))
            decoded = DataLoader(dataset, batch_sampler=chunks, collate_fn=_collate_keyed, pin_memory=self.device.type == "cuda",
                                 num_workers=config.num_workers if len(chunks) > 1 else 0)
            encode_batches(self.cache, self.backend, (([entry_keys[k] for k in kept], raw)
                                                      for kept, raw in one_line_errors(iter(decoded)) if kept))
        self.ranks.barrier()
        if shared and self.ranks.world_size > 1:
            self.cache = EncodingCache(self.cache.folder)
        self.backend.release_encoders()  # from here on training touches only the UNet
        rows = [r for r in range(len(examples)) if all(entry_keys.get((r, f)) in self.cache for f in flips)]
        if not rows:
            raise DataError(f"every one of the {len(examples)} rows was skipped: no image of the dataset reads or decodes")
        return entry_keys, rows

    # --- batches -----------------------------------------------------------------------------------
    def next_batch(self) -> StreamBatch:
        if self._batches is None:
            self._batches = iter(self.loader)
        raw = next(self._batches)
        if self.cache is not None:
            local = self._to_device(raw["batch"])
        else:
            while not raw["prompts"]:  # every row of this batch was skipped as undecodable
                raw = next(self._batches)
            local = encode_collated(self.backend, raw, to_cpu=False)
        return StreamBatch(local, self.ranks.rank, self.local_size, self.ranks.world_size)

    def _to_device(self, batch: TrainBatch) -> TrainBatch:
        if self.device.type != "cuda":
            return batch

        def move(x: Tensor) -> Tensor:
            return x.pin_memory().to(self.device, non_blocking=True)

        return TrainBatch(move(batch.latents), {n: move(v) for n, v in batch.cond.items()}, move(batch.labels),
                          batch.prompts, batch.paired)

    # --- position ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The position after the last batch handed out (however far the workers have read ahead)."""
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Jump straight to the saved position (no image is decoded again)."""
        self.close()
        self.loader.load_state_dict(state)

    def close(self) -> None:
        """Stop the decoding workers (they are also stopped when the stream is garbage-collected)."""
        self._batches = None
        self.loader.close()


def _cache_folder(config: TrainConfig, backend: Backend) -> Path:
    root = Path(config.cache_dir) if config.cache_dir else cache_root() / "encodings"
    return root / backend.model_info().get("hash", "model")
