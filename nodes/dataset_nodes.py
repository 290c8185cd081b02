"""Pairs from a dataset: Pick-a-Pic parquet file/folder, a Hugging Face dataset id, or images + pairs.jsonl."""
from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path

from . import paths
from .store_nodes import PAIRS, PreferencePairs

CATEGORY = "preference/data"
LOCAL_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv", ".arrow")


class IndexedPairs(Sequence):
    """A lazy view of a map-style source in a fixed (optionally shuffled) order: images decode on access."""

    def __init__(self, source, order: list[int], description: str) -> None:
        self.source, self.order, self.description = source, order, description

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.source[self.order[i]] for i in range(*index.indices(len(self)))]
        return self.source[self.order[index]]


def resolve_source(source: str) -> str:
    """A local file or folder inside the data roots (resolved), or `hf:<id>` for the Hugging Face hub.

    Local folders are searched first; only `hf:<id>`, or an `owner/name` that no data root holds, goes to
    the hub. Anything else that is not found says which folders were searched, without a hub call."""
    text = source.strip()
    if not text:
        raise ValueError("source is empty: give a parquet file/folder, an images folder with pairs.jsonl, or a dataset id")
    if text.startswith("hf:"):
        return text
    found = paths.find_data_path(text)
    if found is not None:
        return str(found)
    from ..trainer.hub import looks_like_hub_id

    if looks_like_hub_id(text) and not text.lower().endswith(LOCAL_SUFFIXES):
        return "hf:" + text
    raise ValueError(f"dataset {text!r} not found in {paths.searched()}; a Hugging Face dataset id is owner/name "
                     "(or hf:name)")


class PairsFromDataset:
    DESCRIPTION = ("Read preference pairs from a Pick-a-Pic style parquet file or folder, a Hugging Face dataset id "
                   "(e.g. yuvalkirstain/pickapic_v2), or a folder of images with pairs.jsonl. The winner comes first.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (PAIRS, "INT")
    RETURN_NAMES = ("pairs", "count")
    OUTPUT_TOOLTIPS = ("The dataset's pairs (images decode lazily, when training reads them).", "How many pairs.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "source": ("STRING", {"default": "", "tooltip": "A parquet file or folder, or an images folder with pairs.jsonl, inside ComfyUI's input folder (or a folder in $PREFALIGN_DATASETS_DIR); or a Hugging Face dataset id owner/name (hf:name to skip the local lookup)."}),
            "split": ("STRING", {"default": "train", "tooltip": "Dataset split (Hugging Face datasets only)."}),
            "limit": ("INT", {"default": 0, "min": 0, "max": 100_000_000, "tooltip": "Use at most this many pairs (0: all). Required when streaming."}),
            "shuffle_seed": ("INT", {"default": -1, "min": -1, "max": 0xFFFFFFFF, "tooltip": "Shuffle the pairs with this seed before training (-1: keep the file order)."}),
            "keep_ties": ("BOOLEAN", {"default": False, "tooltip": "Keep tied rows (label 0.5) with the first image as chosen; dropped by default."}),
            "streaming": ("BOOLEAN", {"default": False, "tooltip": "Stream a Hugging Face dataset instead of downloading it whole (reads the first `limit` pairs)."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, source):
        """A path outside the data roots, or one that is nowhere, is refused when the graph is queued."""
        if source is None:  # linked: checked when the node runs
            return True
        try:
            resolve_source(source)
        except ValueError as e:
            return paths.redact(str(e))
        return True

    @classmethod
    def IS_CHANGED(cls, source, split, limit, shuffle_seed, keep_ties, streaming):
        try:
            resolved = resolve_source(source)
        except ValueError:
            return source
        path = Path(resolved)
        if path.is_file():
            st = path.stat()
            return f"{path}:{st.st_size}:{st.st_mtime_ns}"
        if path.is_dir():
            parts = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file())
            return f"{path}:{hash(tuple(parts))}"
        return source

    def load(self, source, split, limit, shuffle_seed, keep_ties, streaming):
        with paths.shown_errors():
            pairs = _read_pairs(source, split, limit, shuffle_seed, keep_ties, streaming)
        return (pairs, len(pairs))


def _read_pairs(source, split, limit, shuffle_seed, keep_ties, streaming) -> Sequence:
    from ..trainer.data.sources import DataSpec, open_examples

    resolved = resolve_source(source)
    spec = DataSpec(source=resolved, split=split, streaming=streaming, keep_ties=keep_ties,
                    limit=limit if limit > 0 else None)
    examples = _open_hub(spec, source.strip()) if resolved.startswith("hf:") else open_examples(spec)
    if hasattr(examples, "__getitem__") and hasattr(examples, "__len__"):
        order = list(range(len(examples)))
        if shuffle_seed >= 0:
            random.Random(shuffle_seed).shuffle(order)
        pairs = IndexedPairs(examples, order, f"dataset:{source}")
    else:  # a stream: materialise the first `limit` rows
        if limit <= 0:
            raise ValueError("streaming needs a limit: set how many pairs to read")
        rows = []
        for shard in range(examples.num_shards()):
            for ex in examples.read_shard(shard):
                if ex is not None:
                    rows.append(ex)
                if len(rows) >= limit:
                    break
            if len(rows) >= limit:
                break
        if shuffle_seed >= 0:
            random.Random(shuffle_seed).shuffle(rows)
        pairs = PreferencePairs(rows, f"dataset:{source}")
    if len(pairs) == 0:
        raise ValueError(f"no pairs in {source!r} (ties are dropped unless keep_ties is on)")
    return pairs


def _open_hub(spec, text: str):
    """A Hugging Face dataset; when it does not load, the message also says where it was looked for locally."""
    from ..trainer.data.sources import open_examples

    implicit = not text.startswith("hf:")
    if implicit:
        logging.info("PrefAlign: %r is not in %s; loading it from the Hugging Face hub", text, paths.searched())
    try:
        return open_examples(spec)
    except ValueError as e:  # the trainer turns every `datasets` failure into one line naming the source
        raise ValueError(f"{text!r} is not in {paths.searched()}; {e}" if implicit else str(e)) from None


NODES = {"PrefAlignPairsFromDataset": (PairsFromDataset, "Preference Pairs from Dataset")}
