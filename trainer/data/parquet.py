"""Parquet files (one file or a folder of shards), indexed up front and read lazily.

Opening reads only the label columns, row group by row group, to validate labels, drop ties
and build an index of kept rows per (file, row group). Images are read on demand a whole row
group at a time into an LRU cache bounded in bytes (at least one row group), so memory stays
bounded whatever the dataset's size while small datasets end up fully cached.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .base import DataStats, MapSource
from .errors import DataError
from .records import PreferenceExample
from .rows import Schema, detect_schema, kept_rows, row_to_example


#: Default budget of the row-group cache (per process: each DataLoader worker has its own).
CACHE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class RowGroup:
    """Kept rows of one row group: `rows` are offsets inside the group, `first_row` its first file row."""

    file: int
    group: int
    first_row: int
    rows: np.ndarray


def parquet_files(path: Path) -> list[Path]:
    """The file itself, or every *.parquet below a folder in sorted order."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
    if not files:
        raise DataError(f"{path}: no .parquet files in this folder")
    return files


def open_parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file (truncated or corrupt?): {e}") from None


class ParquetSource(MapSource):
    """Pick-a-Pic pairs or unpaired feedback rows from parquet; shards are row groups."""

    def __init__(self, path: str | Path, keep_ties: bool = False, limit: int | None = None, cache_bytes: int = CACHE_BYTES):
        self.name = str(path)
        self.files = parquet_files(Path(path))
        self.keep_ties = keep_ties
        self.cache_bytes = cache_bytes
        self.stats = DataStats()
        self._handles: dict[int, pq.ParquetFile] = {}
        self._cache: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()
        schemas = [detect_schema(self._handle(i).schema_arrow.names, str(f)) for i, f in enumerate(self.files)]
        if len(set(schemas)) > 1:
            raise DataError(f"{path}: mixes pair and unpaired files; use one kind per dataset")
        self.schema: Schema = schemas[0]
        self.paired = self.schema.paired
        self.groups = self._index(limit)
        self._ends = np.cumsum([len(g.rows) for g in self.groups])
        self._check_not_empty()

    def _handle(self, file: int) -> pq.ParquetFile:
        if file not in self._handles:
            self._handles[file] = open_parquet(self.files[file])
        return self._handles[file]

    def _index(self, limit: int | None) -> list[RowGroup]:
        groups, kept = [], 0
        for fi, path in enumerate(self.files):
            handle, first_row = self._handle(fi), 0
            for gi in range(handle.num_row_groups):
                if limit is not None and kept >= limit:
                    return groups
                labels = self._read(fi, gi, self.schema.label_columns)
                columns = [labels.column(c).to_pylist() for c in self.schema.label_columns]
                rows = kept_rows(self.schema, columns, lambda r: f"{path} row {first_row + r}", self.keep_ties, self.stats)
                if limit is not None:
                    rows = rows[: limit - kept]
                groups.append(RowGroup(fi, gi, first_row, rows))
                kept += len(rows)
                first_row += labels.num_rows
        return groups

    def _read(self, file: int, group: int, columns: tuple[str, ...]) -> pa.Table:
        try:
            return self._handle(file).read_row_group(group, columns=list(columns))
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{self.files[file]}: row group {group} does not read (corrupt file?): {e}") from None

    def _row_group(self, file: int, group: int) -> pa.Table:
        key = (file, group)
        if key in self._cache:
            self._cache.move_to_end(key)
        else:
            self._cache[key] = self._read(file, group, self.schema.columns)
            while len(self._cache) > 1 and sum(t.nbytes for t in self._cache.values()) > self.cache_bytes:
                self._cache.popitem(last=False)
        return self._cache[key]

    def _example(self, group: RowGroup, row: int) -> PreferenceExample:
        table = self._row_group(group.file, group.group)
        values: dict[str, Any] = {c: table.column(c)[row].as_py() for c in self.schema.columns}
        path = self.files[group.file]
        example = row_to_example(values, self.schema, f"{path} row {group.first_row + row}", True, path.parent)
        assert example is not None
        return example

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, index: int) -> PreferenceExample:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: row index {index} out of range (0..{len(self) - 1})")
        g = int(np.searchsorted(self._ends, index, side="right"))
        start = int(self._ends[g - 1]) if g else 0
        group = self.groups[g]
        return self._example(group, int(group.rows[index - start]))

    def prompts(self) -> list[str]:
        out: list[str] = []
        for group in self.groups:
            captions = self._read(group.file, group.group, ("caption",)).column("caption").to_pylist()
            out.extend("" if captions[r] is None else str(captions[r]) for r in group.rows)
        return out

    def num_shards(self) -> int:
        return len(self.groups)

    def read_shard(self, shard: int, start: int = 0) -> Iterator[PreferenceExample | None]:
        group = self.groups[shard]
        for row in group.rows[start:]:
            yield self._example(group, int(row))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"], state["_cache"] = {}, OrderedDict()
        return state
