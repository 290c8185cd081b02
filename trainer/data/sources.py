"""Open a data source from its specification.

`DataSpec.source` may be:

- a ``.parquet`` file or a folder of parquet shards (Pick-a-Pic pairs or unpaired rows);
- a folder with ``pairs.jsonl`` / ``feedback.jsonl`` (or the ``.jsonl`` file itself);
- a folder written by ``datasets.Dataset.save_to_disk``;
- another local folder goes to ``datasets.load_dataset`` (a folder of data files);
- a hub id such as ``yuvalkirstain/pickapic_v2`` (owner/name), or any string prefixed with ``hf:``,
  goes to ``datasets.load_dataset`` too. Any other string is "no such file or folder".

Labels: the winner comes first (``label_0 == 0`` swaps the images); ties (0.5) are dropped
and counted unless ``keep_ties`` is set, in which case they are kept with ``jpg_0`` first
(labelled as if ``jpg_0`` had won, as the diffusers example does).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..limits import MAX_CELL_BYTES
from ..hub import hub_refusal, looks_like_hub_id
from .base import DataStats, ExampleSource, MapSource, StreamSource
from .errors import DataError
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
    """A map-style source for local data and downloaded datasets; a stream for HF streaming.

    A string that names no existing path goes to the hub only if it looks like a hub id (owner/name) or
    says `hf:`; anything else, and an empty folder, is refused before `datasets` is called."""
    if spec.limit is not None and spec.limit < 1:
        raise ValueError(f"limit must be at least 1, got {spec.limit}")
    if spec.source.startswith("hf:"):
        return _open_hf(spec.source[3:], spec)
    path = Path(spec.source)
    if not path.exists():
        if looks_like_hub_id(spec.source):
            refusal = hub_refusal(spec.source, "dataset")
            if refusal is not None:
                raise DataError(refusal)
            return _open_hf(spec.source, spec)
        raise DataError(f"{spec.source}: no such file or folder (looked at {path.absolute()}); data is a parquet file "
                        "or folder, a folder with pairs.jsonl, or a Hugging Face dataset id (owner/name, or hf:NAME)")
    if path.is_dir() and not any(path.iterdir()):
        raise DataError(f"{spec.source}: the folder is empty (looked for pairs.jsonl, feedback.jsonl, *.parquet or a "
                        "saved Hugging Face dataset)")
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
    """A Hugging Face dataset; the library's own errors (not found, offline, no data files) become one
    line naming the source."""
    try:
        if spec.streaming:
            return HFStreamSource(source, spec.split, spec.keep_ties, spec.limit, spec.allow_outside_paths)
        return HFSource(source, spec.split, spec.keep_ties, spec.limit, spec.allow_outside_paths)
    except DataError:
        raise
    except Exception as e:  # `datasets` raises many types (FileNotFoundError, ConnectionError, its own, ValueError)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{source}: cannot be loaded as a Hugging Face dataset ({type(e).__name__}: {reason})") from None
