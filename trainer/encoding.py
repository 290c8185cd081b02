"""Pixels and prompts -> latents and text conditioning, computed per step or once and cached.

The cache is content-addressed: an entry's key hashes the images' bytes, the prompt, the flip and a
*setting* string (model, VAE, resolution, crop, encoder precision; see `cache_setting`), so it is
reused across runs and methods and never goes stale. Entries live in safetensors shards under the
cache folder; opening the cache reads only the shards' index, and an entry's tensors are read (from
the memory-mapped shard) the first time a batch needs them, then kept in memory up to a budget, so a
dataset larger than RAM trains from the page cache.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from safetensors import safe_open
from torch import Tensor

from .atomic import save_safetensors
from .fingerprint import file_fingerprint
from .data.errors import BadImageError
from .data.records import PreferenceExample, TrainBatch
from .models.backend import Backend

#: Entries per shard file: large enough to keep the file count low, small enough that an interrupted
#: cache fill loses little (each shard is written atomically as soon as it is full).
SHARD_ENTRIES = 256
#: Entries read from disk are kept in memory up to this many bytes (then read from the mmap each time).
MEMORY_BUDGET = 8 << 30
MAX_OPEN_SHARDS = 64


def encode_collated(backend: Backend, raw: dict, to_cpu: bool = True) -> TrainBatch:
    """A collated batch (`prompts`, `pixels` [B,K,3,H,W], `time_ids` [B,K,6], `labels` [B,K]) -> TrainBatch.

    `to_cpu=False` leaves the encodings on the backend's device (per-step encoding: no round trip)."""
    b, k = raw["pixels"].shape[:2]
    pixels = raw["pixels"].transpose(0, 1).reshape(b * k, *raw["pixels"].shape[2:])
    latents = backend.encode_images(pixels)
    text = backend.encode_prompts(raw["prompts"])
    if to_cpu:
        latents, text = latents.cpu(), {name: v.cpu() for name, v in text.items()}
    else:
        device = latents.device
        raw = dict(raw, time_ids=raw["time_ids"].to(device, non_blocking=True),
                   labels=raw["labels"].to(device, non_blocking=True))
    batch = assemble(latents, text, raw["time_ids"], raw["labels"], raw["prompts"])
    batch.cond.update({n: v.to(latents.device) for n, v in image_features(backend, pixels).items()})  # chosen-first
    return batch


def assemble(latents: Tensor, text: dict[str, Tensor], time_ids: Tensor, labels: Tensor, prompts: list[str]) -> TrainBatch:
    """Chosen-first layout: image j of row i goes to row j*B + i; text rows repeat for each image."""
    b, k = labels.shape
    cond = {name: v.repeat(k, *[1] * (v.dim() - 1)) for name, v in text.items()}
    cond["time_ids"] = time_ids.transpose(0, 1).reshape(b * k, -1).float()
    return TrainBatch(latents, cond, labels.transpose(0, 1).reshape(-1).float(), prompts * k, paired=k == 2)


def cache_setting(backend: Backend, resolution: int, center_crop: bool, seed: int, vae: str | None = None) -> str:
    """Everything besides a row's content that changes its encodings: the model, a replacement VAE,
    the encoders' precision, the resolution and the crop (a random crop is drawn from the seed)."""
    parts = [backend.model_info().get("hash", ""), str(resolution), str(center_crop)]
    if not center_crop:
        parts.append(f"seed={seed}")
    if vae:
        parts.append(f"vae={file_fingerprint(vae)}")
    if getattr(backend, "cache_tag", None):
        parts.append(backend.cache_tag)
    dtype = getattr(backend, "weight_dtype", torch.float32)
    if dtype != torch.float32:  # text encoders run in the weight dtype (the VAE stays fp32)
        parts.append(f"text={dtype}")
    return "|".join(parts)


def entry_keys_by_flip(example: PreferenceExample, flips: Sequence[bool], setting: str) -> dict[bool, str]:
    """Content hash of one row as it will be encoded, for each flip; each image is read once. An image file
    that cannot be read raises the error an undecodable image raises (naming the row and the image), so
    `skip_bad_rows` skips it."""
    hashes = {}
    for flip in flips:  # the flip is hashed before the images: one hash per flip
        h = hashes[flip] = hashlib.sha256(setting.encode())
        h.update(example.prompt.encode())
        h.update(bytes([flip]))
    for k, image in enumerate(example.images):
        try:
            data = image if isinstance(image, bytes) else Path(image).read_bytes()
        except OSError as e:
            raise BadImageError(f"{example.image_where(k)}: cannot read {image}: {e.strerror or e}") from None
        for h in hashes.values():
            h.update(data)
    return {flip: h.hexdigest()[:32] for flip, h in hashes.items()}


@dataclass
class CachedEntry:
    latents: Tensor  # [K, C, h, w]
    text: dict[str, Tensor]  # each [1, ...]
    time_ids: Tensor  # [K, 6]
    labels: Tensor  # [K]
    prompt: str
    image: dict[str, Tensor] = field(default_factory=dict)  # per-image features, each [K, ...] (CLIP embeddings)

    def nbytes(self) -> int:
        tensors = [self.latents, self.time_ids, self.labels, *self.text.values(), *self.image.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


class EncodingCache:
    """Encoded rows by content key, backed by safetensors shards in `folder` (None: memory only).

    Opening reads each shard's header only; `get` reads an entry's tensors on first use."""

    def __init__(self, folder: Path | None, memory_budget: int = MEMORY_BUDGET) -> None:
        self.folder = folder
        self.memory_budget = memory_budget
        self.entries: dict[str, CachedEntry] = {}  # in memory
        self.index: dict[str, tuple[Path, str, list[str]]] = {}  # on disk: key -> (shard, prompt, tensor names)
        self._handles: dict[Path, object] = {}
        self._bytes = 0
        self._unsaved: dict[str, CachedEntry] = {}
        if folder is not None and folder.is_dir():
            for shard in sorted(folder.glob("shard-*.safetensors")):
                self._index_shard(shard)

    def _index_shard(self, path: Path) -> None:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            names: dict[str, list[str]] = {}
            for name in f.keys():
                names.setdefault(name.split("/", 1)[0], []).append(name)
        for key, prompt in meta.items():
            if key in names and key not in self.index:
                self.index[key] = (path, prompt, names[key])

    def __contains__(self, key: str) -> bool:
        return key in self.entries or key in self.index

    def __len__(self) -> int:
        return len(set(self.entries) | set(self.index))

    def get(self, key: str) -> CachedEntry:
        entry = self.entries.get(key)
        if entry is not None:
            return entry
        path, prompt, names = self.index[key]
        handle = self._handles.get(path)
        if handle is None:
            if len(self._handles) >= MAX_OPEN_SHARDS:  # bound the open files / mappings
                self._handles.pop(next(iter(self._handles)))
            handle = self._handles[path] = safe_open(str(path), "pt")
        part = {n.split("/", 1)[1]: handle.get_tensor(n) for n in names}
        text = {n[5:]: v for n, v in part.items() if n.startswith("text.")}
        image = {n[6:]: v for n, v in part.items() if n.startswith("image.")}
        entry = CachedEntry(part["latents"], text, part["time_ids"], part["labels"], prompt, image)
        if self._bytes + entry.nbytes() <= self.memory_budget:
            self.entries[key] = entry
            self._bytes += entry.nbytes()
        return entry

    def add(self, new: dict[str, CachedEntry], flush: bool = True) -> None:
        """Add entries; persist them as new shards (atomic). `flush=False` buffers up to SHARD_ENTRIES
        entries before writing a shard (call `flush()` at the end)."""
        self.entries.update(new)
        self._bytes += sum(e.nbytes() for e in new.values())
        if self.folder is None:
            return
        self._unsaved.update(new)
        while len(self._unsaved) >= SHARD_ENTRIES:
            keys = list(self._unsaved)[:SHARD_ENTRIES]
            self._write_shard({k: self._unsaved.pop(k) for k in keys})
        if flush:
            self.flush()

    def flush(self) -> None:
        if self.folder is not None and self._unsaved:
            self._write_shard(self._unsaved)
            self._unsaved = {}

    def _write_shard(self, new: dict[str, CachedEntry]) -> None:
        tensors, meta = {}, {}
        for key, e in new.items():
            meta[key] = e.prompt
            tensors.update({f"{key}/latents": e.latents, f"{key}/time_ids": e.time_ids, f"{key}/labels": e.labels})
            tensors.update({f"{key}/text.{n}": v for n, v in e.text.items()})
            tensors.update({f"{key}/image.{n}": v for n, v in e.image.items()})
        digest = hashlib.sha256("".join(sorted(new)).encode()).hexdigest()[:16]
        save_safetensors(self.folder / f"shard-{digest}.safetensors", tensors, metadata=meta)


def cache_raw_batch(cache: EncodingCache, backend: Backend, keys: Sequence[str], raw: dict, flush: bool = True) -> None:
    """Encode one collated batch (no grad) and add its rows under `keys`."""
    b, k = raw["labels"].shape
    pixels = raw["pixels"].reshape(b * k, *raw["pixels"].shape[2:])
    latents = backend.encode_images(pixels).cpu()
    latents = latents.reshape(b, k, *latents.shape[1:])
    text = {n: v.cpu() for n, v in backend.encode_prompts(raw["prompts"]).items()}
    image = {n: v.cpu().reshape(b, k, *v.shape[1:]) for n, v in image_features(backend, pixels).items()}
    cache.add({key: CachedEntry(latents[i].clone(), text_row(text, i),
                                raw["time_ids"][i].clone(), raw["labels"][i].clone(), raw["prompts"][i],
                                {n: v[i].clone() for n, v in image.items()})
               for i, key in enumerate(keys)}, flush=flush)


def image_features(backend: Backend, pixels: Tensor) -> dict[str, Tensor]:
    """Per-image features a backend adds beside the latents (an `EmbeddingBackend`'s CLIP embeddings)."""
    encode = getattr(backend, "encode_image_features", None)
    return encode(pixels) if encode is not None else {}


def encode_batches(cache: EncodingCache, backend: Backend, batches: Iterable[tuple[Sequence[str], dict]],
                   progress: Callable[[int], None] | None = None) -> None:
    """Encode (keys, collated batch) pairs into the cache; on a CUDA out-of-memory error the batch is
    split in halves and retried (the VAE at 1024 px needs a lot of activation memory)."""
    def encode(keys: Sequence[str], raw: dict) -> None:
        try:
            cache_raw_batch(cache, backend, keys, raw, flush=False)
        except torch.cuda.OutOfMemoryError:
            if len(keys) == 1:
                raise
            torch.cuda.empty_cache()
            half = len(keys) // 2
            for part in (slice(0, half), slice(half, None)):
                encode(keys[part], {n: v[part] for n, v in raw.items() if n in ("prompts", "pixels", "time_ids", "labels")})

    try:
        for keys, raw in batches:
            encode(list(keys), raw)
            if progress is not None:
                progress(len(keys))
    finally:
        cache.flush()


#: a backend's text tensor `size.<name>` [N, dims] gives each row's own size of `name` (ComfyUI: full-length prompts)
SIZE = "size."


def text_row(text: dict[str, Tensor], i: int) -> dict[str, Tensor]:
    """Row i of a batch's text tensors, each cut to the row's own size where the backend gives one: the cache keeps
    every prompt at its own length, whatever it was encoded beside."""
    out = {}
    for name, value in text.items():
        row = value[i : i + 1]
        sizes = text.get(SIZE + name)
        if sizes is not None:
            row = row[(slice(None), *[slice(0, int(d)) for d in sizes[i].tolist()])]
        out[name] = row.clone()
    return out


def concat_rows(rows: Sequence[Tensor | None]) -> Tensor:
    """Rows [1, ...] of one text tensor -> [N, ...]. Rows of different sizes (full-length T5/LLM conditioning
    in ComfyUI) are zero-padded at the end of every axis to the largest; a missing row (None) is all zeros. A
    backend that needs each row's own size gives it beside (`SIZE`)."""
    present = [r for r in rows if r is not None]
    shape = [max(sizes) for sizes in zip(*(r.shape[1:] for r in present))]
    if all(r is not None and list(r.shape[1:]) == shape for r in rows):
        return torch.cat(present)
    out = present[0].new_zeros(len(rows), *shape)
    for i, r in enumerate(rows):
        if r is not None:
            out[(i, *[slice(0, n) for n in r.shape[1:]])] = r[0]
    return out


def batch_from_cache(cache: EncodingCache, keys: Sequence[str]) -> TrainBatch:
    entries = [cache.get(k) for k in keys]
    latents = torch.stack([e.latents for e in entries])  # [B, K, ...]
    b, k = latents.shape[:2]
    names = dict.fromkeys(n for e in entries for n in e.text)  # in first-seen order
    text = {n: concat_rows([e.text.get(n) for e in entries]) for n in names}
    batch = assemble(latents.transpose(0, 1).reshape(b * k, *latents.shape[2:]), text,
                     torch.stack([e.time_ids for e in entries]), torch.stack([e.labels for e in entries]),
                     [e.prompt for e in entries])
    for n in entries[0].image:
        image = torch.stack([e.image[n] for e in entries])  # [B, K, ...] -> chosen-first rows
        batch.cond[n] = image.transpose(0, 1).reshape(b * k, *image.shape[2:])
    return batch
