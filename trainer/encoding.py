"""Pixels and prompts -> latents and text conditioning, computed per step or once and cached.

The cache is content-addressed: an entry's key hashes the images' bytes, the prompt, the flip, the
resolution/crop and the model, so it is reused across runs and methods and never goes stale. Entries
live in memory and in safetensors shards under the cache folder.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors import safe_open
from torch import Tensor

from .atomic import save_safetensors
from .data.records import PreferenceExample, TrainBatch
from .models.backend import Backend


def encode_collated(backend: Backend, raw: dict) -> TrainBatch:
    """A collated batch (`prompts`, `pixels` [B,K,3,H,W], `time_ids` [B,K,6], `labels` [B,K]) -> TrainBatch."""
    b, k = raw["pixels"].shape[:2]
    pixels = raw["pixels"].transpose(0, 1).reshape(b * k, *raw["pixels"].shape[2:])
    latents = backend.encode_images(pixels).cpu()
    text = {name: v.cpu() for name, v in backend.encode_prompts(raw["prompts"]).items()}
    return assemble(latents, text, raw["time_ids"], raw["labels"], raw["prompts"])


def assemble(latents: Tensor, text: dict[str, Tensor], time_ids: Tensor, labels: Tensor, prompts: list[str]) -> TrainBatch:
    """Chosen-first layout: image j of row i goes to row j*B + i; text rows repeat for each image."""
    b, k = labels.shape
    cond = {name: v.repeat(k, *[1] * (v.dim() - 1)) for name, v in text.items()}
    cond["time_ids"] = time_ids.transpose(0, 1).reshape(b * k, -1).float()
    return TrainBatch(latents, cond, labels.transpose(0, 1).reshape(-1).float(), prompts * k, paired=k == 2)


def entry_key(example: PreferenceExample, flip: bool, setting: str) -> str:
    """Content hash of one row as it will be encoded."""
    h = hashlib.sha256(setting.encode())
    h.update(example.prompt.encode())
    h.update(bytes([flip]))
    for image in example.images:
        h.update(image if isinstance(image, bytes) else Path(image).read_bytes())
    return h.hexdigest()[:32]


@dataclass
class CachedEntry:
    latents: Tensor  # [K, C, h, w]
    text: dict[str, Tensor]  # each [1, ...]
    time_ids: Tensor  # [K, 6]
    labels: Tensor  # [K]
    prompt: str


class EncodingCache:
    """Encoded rows by content key, backed by safetensors shards in `folder` (None: memory only)."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.entries: dict[str, CachedEntry] = {}
        if folder is not None and folder.is_dir():
            for shard in sorted(folder.glob("shard-*.safetensors")):
                self._read_shard(shard)

    def _read_shard(self, path: Path) -> None:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            for key, prompt in meta.items():
                names = [n for n in f.keys() if n.startswith(key + "/")]
                part = {n.split("/", 1)[1]: f.get_tensor(n) for n in names}
                text = {n[5:]: v for n, v in part.items() if n.startswith("text.")}
                self.entries[key] = CachedEntry(part["latents"], text, part["time_ids"], part["labels"], prompt)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def add(self, new: dict[str, CachedEntry]) -> None:
        """Add entries and persist them as one new shard (atomic)."""
        self.entries.update(new)
        if self.folder is None or not new:
            return
        tensors, meta = {}, {}
        for key, e in new.items():
            meta[key] = e.prompt
            tensors.update({f"{key}/latents": e.latents, f"{key}/time_ids": e.time_ids, f"{key}/labels": e.labels})
            tensors.update({f"{key}/text.{n}": v for n, v in e.text.items()})
        digest = hashlib.sha256("".join(sorted(new)).encode()).hexdigest()[:16]
        save_safetensors(self.folder / f"shard-{digest}.safetensors", tensors, metadata=meta)


def fill_cache(cache: EncodingCache, backend: Backend, keyed: Iterable[tuple[str, object]], batch_size: int = 8,
               progress=None) -> None:
    """Encode the (key, ProcessedExample) items missing from the cache, in batches, without grad."""
    from .data.dataset import collate

    pending: list[tuple[str, object]] = []

    def flush() -> None:
        if not pending:
            return
        raw = collate([item for _, item in pending])
        b, k = raw["labels"].shape
        pixels = raw["pixels"].reshape(b * k, *raw["pixels"].shape[2:])
        latents = backend.encode_images(pixels).cpu()
        latents = latents.reshape(b, k, *latents.shape[1:])
        text = backend.encode_prompts(raw["prompts"])
        cache.add({key: CachedEntry(latents[i].clone(), {n: v[i : i + 1].cpu().clone() for n, v in text.items()},
                                    raw["time_ids"][i].clone(), raw["labels"][i].clone(), raw["prompts"][i])
                   for i, (key, _) in enumerate(pending)})
        if progress is not None:
            progress(len(pending))
        pending.clear()

    for key, item in keyed:
        if key in cache:
            continue
        pending.append((key, item))
        if len(pending) == batch_size:
            flush()
    flush()


def batch_from_cache(cache: EncodingCache, keys: Sequence[str]) -> TrainBatch:
    entries = [cache.entries[k] for k in keys]
    latents = torch.stack([e.latents for e in entries])  # [B, K, ...]
    b, k = latents.shape[:2]
    text = {n: torch.cat([e.text[n] for e in entries]) for n in entries[0].text}
    return assemble(latents.transpose(0, 1).reshape(b * k, *latents.shape[2:]), text,
                    torch.stack([e.time_ids for e in entries]), torch.stack([e.labels for e in entries]),
                    [e.prompt for e in entries])
