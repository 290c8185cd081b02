"""Hugging Face datasets: a hub id or local dataset through `datasets.load_dataset`, or a
folder written by `save_to_disk`; indexed (map-style) or streamed shard by shard.

Dataset loading scripts are never run: a local folder with one is refused before `datasets` sees
it, and `trust_remote_code=False` is passed to the `datasets` versions (2.20 to 3.x) that would
otherwise ask or run it (4.0 dropped scripts). Image path cells resolve inside the dataset's
folder (a hub dataset's: the Hugging Face caches) unless outside paths are allowed.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from .base import DataStats, MapSource, StreamSource
from .errors import DataError
from .records import PreferenceExample
from .rows import Schema, detect_schema, kept_rows, row_to_example

if TYPE_CHECKING:
    import datasets

SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_LABEL_BLOCK = 10_000
_STREAM_BATCH = 16


def load_hf(source: str, split: str, streaming: bool) -> datasets.Dataset | datasets.IterableDataset:
    """Load one split, with image columns left as encoded bytes."""
    import datasets  # imported on use: it is slow to import and only this path needs it

    path = Path(source)
    script = path / f"{path.name}.py"
    if path.is_dir() and script.is_file():  # how `datasets` finds a local loading script
        raise DataError(f"{source}: holds a dataset loading script ({script.name}); PrefAlign never runs dataset "
                        "code. Convert the dataset to parquet files (or save_to_disk) and train on those")
    if path.is_dir() and any((path / m).exists() for m in SAVED_MARKERS):
        loaded = datasets.load_from_disk(source)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{source}: no split {split!r} (has {', '.join(loaded)})")
            loaded = loaded[split]
        ds: Any = loaded.to_iterable_dataset(num_shards=max(1, min(64, len(loaded) // 1000))) if streaming else loaded
    else:
        asks = "trust_remote_code" in inspect.signature(datasets.load_dataset).parameters
        no_code = {"trust_remote_code": False} if asks else {}
        ds = datasets.load_dataset(source, split=split, streaming=streaming, **no_code)
    for column, feature in (ds.features or {}).items():
        if isinstance(feature, datasets.Image) and feature.decode:
            ds = ds.cast_column(column, datasets.Image(decode=False))
    return ds


def image_places(source: str, allow_outside_paths: bool) -> tuple[Path | None, tuple[Path, ...] | None]:
    """The dataset's folder (None for a hub id), which relative image paths start from, and where its image paths
    may point (None: anywhere): that folder, or for a hub id the Hugging Face caches."""
    folder = Path(source) if Path(source).is_dir() else None
    if allow_outside_paths:
        return folder, None
    if folder is not None:
        return folder, (folder,)
    import datasets
    from huggingface_hub import constants

    return None, (Path(constants.HF_HUB_CACHE), Path(datasets.config.HF_DATASETS_CACHE))


def _columns(ds: datasets.Dataset | datasets.IterableDataset, name: str) -> list[str]:
    if ds.column_names is not None:
        return list(ds.column_names)
    first = next(iter(ds), None)
    if first is None:
        raise DataError(f"{name}: the dataset is empty")
    return list(first)


class HFSource(MapSource):
    """A downloaded (arrow-backed) dataset; the label columns are indexed at open."""

    def __init__(self, source: str, split: str = "train", keep_ties: bool = False, limit: int | None = None,
                 allow_outside_paths: bool = False):
        self.name = f"{source} [{split}]"
        self.stats = DataStats()
        self.folder, self.roots = image_places(source, allow_outside_paths)
        ds = load_hf(source, split, streaming=False)
        self.schema: Schema = detect_schema(_columns(ds, self.name), self.name)
        self.ds = ds.select_columns(list(self.schema.columns))
        self.paired = self.schema.paired
        labels = self.ds.select_columns(list(self.schema.label_columns)).with_format("arrow")
        kept = []
        for start in range(0, len(self.ds), _LABEL_BLOCK):
            if limit is not None and sum(map(len, kept)) >= limit:
                break
            block = labels[start : start + _LABEL_BLOCK]
            columns = [block.column(c).to_pylist() for c in self.schema.label_columns]
            kept.append(start + kept_rows(self.schema, columns, lambda r: self._where(start + r), keep_ties, self.stats))
        self.rows = np.concatenate(kept)[:limit] if kept else np.zeros(0, dtype=np.int64)
        self._check_not_empty()

    def _where(self, row: int) -> str:
        return f"{self.name} row {row}"

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> PreferenceExample:
        row = int(self.rows[index])
        example = row_to_example(self.ds[row], self.schema, self._where(row), True, self.folder, self.roots)
        assert example is not None
        return example

    def prompts(self) -> list[str]:
        captions = self.ds.select_columns(["caption"]).with_format("arrow")[:].column("caption").to_pylist()
        return ["" if captions[r] is None else str(captions[r]) for r in self.rows]


class HFStreamSource(StreamSource):
    """A streamed dataset (`streaming=True`): nothing is downloaded up front; shards are the
    dataset's own shards (files), read in order; a resume inside a shard skips rows of that shard."""

    def __init__(self, source: str, split: str = "train", keep_ties: bool = False, limit: int | None = None,
                 allow_outside_paths: bool = False):
        self.name = f"{source} [{split}]"
        self.stats = DataStats()
        self.keep_ties = keep_ties
        self.folder, self.roots = image_places(source, allow_outside_paths)
        ds = load_hf(source, split, streaming=True)
        self.schema: Schema = detect_schema(_columns(ds, self.name), self.name)
        self.paired = self.schema.paired
        ds = ds.select_columns(list(self.schema.columns))
        self.ds = ds.take(limit) if limit is not None else ds

    def num_shards(self) -> int:
        return self.ds.num_shards

    def read_shard(self, shard: int, start: int = 0) -> Iterator[PreferenceExample | None]:
        part = self.ds.shard(num_shards=self.num_shards(), index=shard, contiguous=True)
        # `iter` rather than `__iter__`: inside a DataLoader worker, `__iter__` would split the
        # shard again between workers; the sharding here is already done by the caller.
        row = start
        for batch in (part.skip(start) if start else part).iter(batch_size=_STREAM_BATCH):
            for values in zip(*batch.values()):
                yield row_to_example(dict(zip(batch, values)), self.schema, f"{self.name} shard {shard} row {row}",
                                     self.keep_ties, self.folder, self.roots)
                row += 1
