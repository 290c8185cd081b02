"""The stream of training batches: sampler keys -> (cached or freshly encoded) `TrainBatch`es.

Every rank draws the same global batch of keys and keeps its own share, so a run on W processes
with batch B sees exactly the data and noise of one process with batch W*B. The position in the
stream is the sampler's (epoch, index): resuming jumps straight there.

Images are decoded by a DataLoader (`num_workers` processes, reading ahead, pinned memory on CUDA),
both for filling the cache and for per-step encoding (`cache = false`); only the VAE / text-encoder
calls run in the main process. However far the workers have read ahead, `state_dict()` is the
position after the last batch handed out. On CUDA a batch is handed out already on the device
(copied asynchronously from pinned memory), so the loop's own `.to(device)` is a no-op.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from .config import TrainConfig
from .data.loader import make_loader
from .data.dataset import Key, PreferenceDataset, ResumableSampler, collate
from .data.records import PreferenceExample, TrainBatch
from .data.transforms import ImageTransform
from .distributed import Ranks
from .encoding import EncodingCache, batch_from_cache, cache_setting, encode_batches, encode_collated, entry_key
from .methods import Method
from .models.backend import Backend
from .models.tiny import cache_root

#: Images per VAE call when filling the cache, at 512 px (scaled by area for other resolutions).
ENCODE_IMAGES_AT_512 = 16
MAX_ROWS_PER_CALL = 16


@dataclass
class StreamBatch:
    local: TrainBatch  # this rank's rows, chosen-first
    rows: Tensor  # their indices in the global chosen-first batch
    global_shape: torch.Size  # latents shape of the global batch


class _KeyBatches:
    """A DataLoader batch sampler: this rank's keys of each global batch, forever; queues the sampler
    state after each batch so the stream knows its position whatever the workers read ahead."""

    def __init__(self, stream: "BatchStream") -> None:
        self.stream = stream

    def __iter__(self) -> Iterator[list[Key]]:
        s = self.stream
        while True:
            keys = list(itertools.islice(s.keys, s.global_size))
            s._states.append(s.sampler.state_dict())
            yield keys[s.ranks.rank * s.local_size : (s.ranks.rank + 1) * s.local_size]


class BatchStream:
    def __init__(self, config: TrainConfig, backend: Backend, examples: Sequence[PreferenceExample],
                 method: Method, ranks: Ranks) -> None:
        self.backend, self.ranks = backend, ranks
        self.local_size = config.batch_size
        self.global_size = config.batch_size * ranks.world_size
        self.num_workers = config.num_workers
        self.device = torch.device(backend.device)
        self.pin = self.device.type == "cuda"
        self.transform = ImageTransform(config.resolution, config.center_crop, config.max_pixels, config.max_image_bytes)
        self.dataset = PreferenceDataset(examples, self.transform, config.seed)
        related = getattr(method, "wants_related_prompts", False)
        self.sampler = ResumableSampler(len(examples), config.seed, config.random_flip, related,
                                        prompts=_prompts(examples) if related else None,
                                        group_size=self.global_size)
        self.keys = iter(self.sampler)
        self._state = self.sampler.state_dict()  # position after the last batch handed out
        self._states: deque[dict] = deque()  # positions after the batches the loader has queued
        self._loader: Iterator[dict] | None = None
        self.cache = None
        if config.cache:
            self.cache = EncodingCache(_cache_folder(config, backend))
            self._fill_cache(config, examples)

    # --- the cache ---------------------------------------------------------------------------------
    def _fill_cache(self, config: TrainConfig, examples: Sequence[PreferenceExample]) -> None:
        """Encode every (row, flip) the run can draw once. With a cache folder the ranks split the
        missing rows and each writes its own shards; without one every rank encodes all of them."""
        flips = (False, True) if config.random_flip else (False,)
        setting = cache_setting(self.backend, config.resolution, config.center_crop, config.seed, config.vae)
        self.entry_keys = {(row, flip): entry_key(examples[row], flip, setting)
                           for row in range(len(examples)) for flip in flips}
        shared = self.cache.folder is not None
        missing, seen = [], set()
        for k, key in self.entry_keys.items():
            if key not in self.cache and key not in seen:  # identical rows are encoded once
                seen.add(key)
                missing.append((k, key))
        if shared and self.ranks.world_size > 1:
            self.ranks.barrier()  # every rank has listed the cache before any rank adds a shard to it
            missing = missing[self.ranks.rank :: self.ranks.world_size]
        if missing:
            images = ENCODE_IMAGES_AT_512 * 512 * 512 // config.resolution ** 2
            per_call = max(1, min(MAX_ROWS_PER_CALL, images // len(examples[0].images)))
            chunks = [missing[i : i + per_call] for i in range(0, len(missing), per_call)]
            loader = self._decode([[k for k, _ in chunk] for chunk in chunks])
            encode_batches(self.cache, self.backend, (([key for _, key in chunk], raw) for chunk, raw in zip(chunks, loader)))
        self.ranks.barrier()
        if shared and self.ranks.world_size > 1:
            self.cache = EncodingCache(self.cache.folder)
        self.backend.release_encoders()  # from here on training touches only the UNet

    def _decode(self, batches) -> Iterator[dict]:
        """Collated batches of processed rows for the given key batches, decoded by the workers."""
        workers = self.num_workers if len(batches) > 1 else 0
        return iter(DataLoader(self.dataset, batch_sampler=batches, collate_fn=collate, num_workers=workers,
                               pin_memory=self.pin))

    # --- batches -----------------------------------------------------------------------------------
    def next_batch(self) -> StreamBatch:
        if self.cache is not None:
            keys = list(itertools.islice(self.keys, self.global_size))
            self._state = self.sampler.state_dict()
            mine = keys[self.ranks.rank * self.local_size : (self.ranks.rank + 1) * self.local_size]
            local = self._to_device(batch_from_cache(self.cache, [self.entry_keys[k] for k in mine]))
        else:
            if self._loader is None:
                self._states.clear()
                self._loader = iter(DataLoader(self.dataset, batch_sampler=_KeyBatches(self), collate_fn=collate,
                                               num_workers=self.num_workers, pin_memory=self.pin,
                                               prefetch_factor=4 if self.num_workers else None))
            raw = next(self._loader)
            self._state = self._states.popleft()
            local = encode_collated(self.backend, raw, to_cpu=False)
        k = 2 if local.paired else 1
        start = self.ranks.rank * self.local_size
        rows = torch.cat([torch.arange(start, start + self.local_size) + j * self.global_size for j in range(k)])
        return StreamBatch(local, rows, torch.Size((self.global_size * k, *local.latents.shape[1:])))

    def _to_device(self, batch: TrainBatch) -> TrainBatch:
        if self.device.type != "cuda":
            return batch

        def move(x: Tensor) -> Tensor:
            return x.pin_memory().to(self.device, non_blocking=True)

        return TrainBatch(move(batch.latents), {n: move(v) for n, v in batch.cond.items()}, move(batch.labels),
                          batch.prompts, batch.paired)

    # --- position ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        """Jump straight to the saved position (no image is decoded again)."""
        self.close()
        self.sampler.load_state_dict(state)
        self.keys = iter(self.sampler)
        self._state = self.sampler.state_dict()

    def close(self) -> None:
        """Stop the decoding workers (they are also stopped when the stream is garbage-collected)."""
        loader, self._loader = self._loader, None
        if loader is not None and hasattr(loader, "_shutdown_workers"):
            loader._shutdown_workers()
        self._states.clear()


def _cache_folder(config: TrainConfig, backend: Backend) -> Path:
    root = Path(config.cache_dir) if config.cache_dir else cache_root() / "encodings"
    return root / backend.model_info().get("hash", "model")


def _prompts(examples: Sequence[PreferenceExample]) -> list[str]:
    """Every row's prompt; a data source answers without reading images."""
    prompts = getattr(examples, "prompts", None)
    return prompts() if callable(prompts) else [e.prompt for e in examples]


class StreamingBatchStream:
    """Batches read shard by shard (parquet row groups, HF shards) with a bounded shuffle buffer:
    memory stays bounded whatever the dataset size. Each rank reads its own shards; images are
    encoded every step (there is no finite set of rows to cache). The position is the loader's
    (shard, row, offset) per worker: resuming reads no skipped data."""

    def __init__(self, config: TrainConfig, backend: Backend, source, method: Method, ranks: Ranks) -> None:
        if getattr(method, "wants_related_prompts", False):
            raise ValueError(f"method {method.name!r} groups related prompts in a batch, which needs random "
                             "access to every prompt: use a local dataset without --streaming")
        self.backend, self.ranks, self.local_size = backend, ranks, config.batch_size
        transform = ImageTransform(config.resolution, config.center_crop, config.max_pixels, config.max_image_bytes)
        self.loader = make_loader(source, transform, seed=config.seed,
                                  batch_size=config.batch_size, num_workers=config.num_workers,
                                  random_flip=config.random_flip, streaming=True, skip_bad_rows=config.skip_bad_rows,
                                  rank=ranks.rank, world_size=ranks.world_size)
        self._batches: Iterator[dict] | None = None

    def next_batch(self) -> StreamBatch:
        if self._batches is None:
            self._batches = iter(self.loader)
        raw = next(self._batches)
        while not raw["prompts"]:  # every row of this batch was skipped as undecodable
            raw = next(self._batches)
        local = encode_collated(self.backend, raw, to_cpu=False)
        b, k = raw["labels"].shape
        start = self.ranks.rank * self.local_size
        global_size = self.local_size * self.ranks.world_size
        rows = torch.cat([torch.arange(start, start + b) + j * global_size for j in range(k)])
        return StreamBatch(local, rows, torch.Size((global_size * k, *local.latents.shape[1:])))

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._batches = None

    def close(self) -> None:
        self._batches = None


def open_batches(config: TrainConfig, backend: Backend, examples, method: Method, ranks: Ranks):
    """A `BatchStream` over random-access data, or a `StreamingBatchStream` when streaming."""
    if config.streaming or not hasattr(examples, "__getitem__"):
        return StreamingBatchStream(config, backend, examples, method, ranks)
    return BatchStream(config, backend, examples, method, ranks)
