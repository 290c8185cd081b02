"""Open a data source from its specification.

`DataSpec.source` may be:

- a ``.parquet`` file or a folder of parquet shards (Pick-a-Pic pairs or unpaired rows);
- a folder with ``pairs.jsonl`` / ``feedback.jsonl`` (or the ``.jsonl`` file itself);
- a folder written by ``datasets.Dataset.save_to_disk``;
- anything else (or any string prefixed with ``hf:``) goes to ``datasets.load_dataset``:
  a hub id such as ``yuvalkirstain/pickapic_v2``, or a local folder of data files.

Labels: the winner comes first (``label_0 == 0`` swaps the images); ties (0.5) are dropped
and counted unless ``keep_ties`` is set, in which case they are kept with ``jpg_0`` first
(labelled as if ``jpg_0`` had won, as the diffusers example does).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..limits import MAX_CELL_BYTES
from .base import DataStats, ExampleSource, MapSource, StreamSource
from .folder import JsonlFolderSource, find_jsonl
from .hf import SAVED_MARKERS, HFSource, HFStreamSource
from .parquet import ParquetSource

__all__ = ["DataSpec", "DataStats", "ExampleSource", "MapSource", "StreamSource", "open_examples"]


@dataclass
class DataSpec:
    """Where the data is and how rows are filtered.

    `streaming`: for a hub id, stream instead of downloading; for any source, read it shard by
    shard (parquet: row group by row group) with a bounded shuffle buffer instead of random access.
    `skip_bad_rows`: rows whose images do not decode are skipped and counted instead of stopping.
    `limit`: use at most this many rows: kept rows for indexed sources; for a streamed Hugging
    Face dataset, rows read (`IterableDataset.take`, ties included).
    `max_cell_bytes`: parquet pages (so cells) above this are refused before they are read.
    `allow_outside_paths`: image paths may point outside the dataset's folder.
    """

    source: str
    split: str = "train"
    streaming: bool = False
    keep_ties: bool = False
    skip_bad_rows: bool = False
    limit: int | None = None
    max_cell_bytes: int = MAX_CELL_BYTES
    allow_outside_paths: bool = False


def open_examples(spec: DataSpec) -> ExampleSource:
    """A map-style source for local data and downloaded datasets; a stream for HF streaming."""
    if spec.limit is not None and spec.limit < 1:
        raise ValueError(f"limit must be at least 1, got {spec.limit}")
    if spec.source.startswith("hf:"):
        return _open_hf(spec.source[3:], spec)
    path = Path(spec.source)
    if path.is_file() and path.suffix == ".parquet":
        return ParquetSource(path, spec.keep_ties, spec.limit, max_cell_bytes=spec.max_cell_bytes,
                             allow_outside_paths=spec.allow_outside_paths)
    jsonl = find_jsonl(path)
    if jsonl is not None:
        return JsonlFolderSource(jsonl, spec.limit, spec.allow_outside_paths)
    if path.is_dir() and not any((path / m).exists() for m in SAVED_MARKERS) and any(path.rglob("*.parquet")):
        return ParquetSource(path, spec.keep_ties, spec.limit, max_cell_bytes=spec.max_cell_bytes,
                             allow_outside_paths=spec.allow_outside_paths)
    if path.is_file():
        raise ValueError(f"{path}: unsupported file type (expected .parquet or .jsonl)")
    return _open_hf(spec.source, spec)


def _open_hf(source: str, spec: DataSpec) -> ExampleSource:
    if spec.streaming:
        return HFStreamSource(source, spec.split, spec.keep_ties, spec.limit, spec.allow_outside_paths)
    return HFSource(source, spec.split, spec.keep_ties, spec.limit, spec.allow_outside_paths)
