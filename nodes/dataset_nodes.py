"""Pairs from a dataset: Pick-a-Pic parquet file/folder, a Hugging Face dataset id, or images + pairs.jsonl."""
from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path

from . import comfy_env
from .store_nodes import PAIRS, PreferencePairs

CATEGORY = "preference/data"


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
    """Relative local paths are inside ComfyUI's input directory; hub ids pass through."""
    source = source.strip()
    if not source:
        raise ValueError("source is empty: give a parquet file/folder, an images folder with pairs.jsonl, or a dataset id")
    if source.startswith("hf:") or os.path.isabs(source):
        return source
    try:
        candidate = Path(comfy_env.folder_paths().get_input_directory()) / source
    except ImportError:
        return source
    return str(candidate) if candidate.exists() else source


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
            "source": ("STRING", {"default": "", "tooltip": "Parquet file or folder, images folder with pairs.jsonl (relative paths are inside ComfyUI's input directory), or a Hugging Face dataset id (prefix hf: to force)."}),
            "split": ("STRING", {"default": "train", "tooltip": "Dataset split (Hugging Face datasets only)."}),
            "limit": ("INT", {"default": 0, "min": 0, "max": 100_000_000, "tooltip": "Use at most this many pairs (0: all). Required when streaming."}),
            "shuffle_seed": ("INT", {"default": -1, "min": -1, "max": 0xFFFFFFFF, "tooltip": "Shuffle the pairs with this seed before training (-1: keep the file order)."}),
            "keep_ties": ("BOOLEAN", {"default": False, "tooltip": "Keep tied rows (label 0.5) with the first image as chosen; dropped by default."}),
            "streaming": ("BOOLEAN", {"default": False, "tooltip": "Stream a Hugging Face dataset instead of downloading it whole (reads the first `limit` pairs)."}),
        }}

    @classmethod
    def IS_CHANGED(cls, source, split, limit, shuffle_seed, keep_ties, streaming):
        path = Path(resolve_source(source))
        if path.is_file():
            st = path.stat()
            return f"{path}:{st.st_size}:{st.st_mtime_ns}"
        if path.is_dir():
            parts = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file())
            return f"{path}:{hash(tuple(parts))}"
        return source

    def load(self, source, split, limit, shuffle_seed, keep_ties, streaming):
        from ..trainer.data.sources import DataSpec, open_examples

        resolved = resolve_source(source)
        spec = DataSpec(source=resolved, split=split, streaming=streaming, keep_ties=keep_ties,
                        limit=limit if limit > 0 else None)
        examples = open_examples(spec)
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
        return (pairs, len(pairs))


NODES = {"PrefAlignPairsFromDataset": (PairsFromDataset, "Preference Pairs from Dataset")}
