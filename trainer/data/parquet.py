"""Parquet files (one file or a folder of shards), indexed up front and read lazily.

Opening reads only the label columns, row group by row group, to validate labels, drop ties
and build an index of kept rows per (file, row group). Images are read on demand into an LRU
cache bounded in bytes (at least one read), so memory stays bounded whatever the dataset's size
while small datasets end up fully cached.

Before any column of a row group is read, the headers of its pages are checked (parquet_pages.py):
a page above `max_cell_bytes` is refused naming the file, row and column, and the rows are read
in blocks whose materialised size is bounded by BLOCK_BYTES (a whole row group when it fits,
which is the usual case: `datasets` writes image datasets in row groups of 100 rows). Reading the
rows of a big row group out of order re-reads it from its start; rows in order cost one read.

For other code reading Pick-a-Pic rows from parquet (the pack's pair store): with
``source = ParquetSource(path, keep_ties=..., max_cell_bytes=..., allow_outside_paths=...)``,
``source[i]`` for ``i in range(len(source))`` gives the kept rows in file order (winner first,
``example.source`` naming file and row), every limit applied and memory bounded; errors are
DataError, BadImageError comes later from decoding the images.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..limits import MAX_CELL_BYTES
from .base import DataStats, MapSource
from .errors import DataError
from .parquet_pages import DICTIONARY_PAGE, Page, chunk_pages, read_cost
from .records import PreferenceExample
from .rows import Schema, detect_schema, kept_rows, row_to_example

#: Default budget of the block cache (per process: each DataLoader worker has its own).
CACHE_BYTES = 256 * 2**20
#: The most one read of rows may materialise, by the page headers' count.
BLOCK_BYTES = 64 * 2**20
#: pyarrow reads a column chunk through a buffer of this size instead of all at once.
_IO_BUFFER = 2**20
_VALUE_WIDTH = {"BOOLEAN": 1, "INT32": 4, "FLOAT": 4, "INT64": 8, "DOUBLE": 8, "INT96": 12}


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
    try:  # unbuffered or pre-buffered, pyarrow would load whole column chunks to read one row
        return pq.ParquetFile(path, buffer_size=_IO_BUFFER, pre_buffer=False)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file (truncated or corrupt?): {e}") from None


class ParquetSource(MapSource):
    """Pick-a-Pic pairs or unpaired feedback rows from parquet; shards are row groups.

    `max_cell_bytes` refuses pages (hence cells) above it; image path cells must resolve inside
    the dataset folder unless `allow_outside_paths`."""

    def __init__(self, path: str | Path, keep_ties: bool = False, limit: int | None = None,
                 cache_bytes: int = CACHE_BYTES, max_cell_bytes: int = MAX_CELL_BYTES,
                 allow_outside_paths: bool = False):
        self.name = str(path)
        self.files = parquet_files(Path(path))
        root = Path(path) if Path(path).is_dir() else Path(path).parent
        self.roots = None if allow_outside_paths else (root,)  # where image path cells may point (None: anywhere)
        self.keep_ties = keep_ties
        self.cache_bytes = cache_bytes
        self.block_bytes = BLOCK_BYTES
        self.max_cell_bytes = max_cell_bytes
        self.stats = DataStats()
        self._handles: dict[int, pq.ParquetFile] = {}
        self._cache: OrderedDict[tuple[int, int, int], pa.Table] = OrderedDict()
        self._rows_per_read: dict[tuple[int, int, tuple[str, ...]], int] = {}
        self._cursor: _Cursor | None = None
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
                blocks, offset = [], 0
                for labels in self._reads(fi, gi, self.schema.label_columns, first_row):
                    columns = [labels.column(c).to_pylist() for c in self.schema.label_columns]
                    blocks.append(offset + kept_rows(self.schema, columns, lambda r, start=first_row + offset:
                                                     f"{path} row {start + r}", self.keep_ties, self.stats))
                    offset += labels.num_rows
                rows = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int64)
                if limit is not None:
                    rows = rows[: limit - kept]
                groups.append(RowGroup(fi, gi, first_row, rows))
                kept += len(rows)
                first_row += handle.metadata.row_group(gi).num_rows
        return groups

    def _plan(self, file: int, group: int, columns: tuple[str, ...], first_row: int) -> int:
        """Rows per read of these columns, after checking every page header of their column chunks."""
        key = (file, group, columns)
        if key not in self._rows_per_read:
            path, handle = self.files[file], self._handle(file)
            meta = handle.metadata.row_group(group)
            total, row_max = 0, 1
            with open(path, "rb") as f:
                for j in range(meta.num_columns):
                    leaf = handle.schema.column(j)
                    column = leaf.path.split(".")[0]
                    if column not in columns:
                        continue
                    if leaf.max_repetition_level > 0:
                        raise DataError(f"{path}: column {column!r} holds lists; expected numbers, text, image "
                                        "bytes or an image path")
                    pages = self._checked_pages(f, meta.column(j), path, column, first_row)
                    width = leaf.length if leaf.physical_type == "FIXED_LEN_BYTE_ARRAY" else \
                        _VALUE_WIDTH.get(leaf.physical_type)
                    cost, one_row = read_cost(pages, width)
                    total, row_max = total + cost, row_max + one_row
            self._rows_per_read[key] = max(1, meta.num_rows if total <= self.block_bytes else self.block_bytes // row_max)
        return self._rows_per_read[key]

    def _checked_pages(self, f: BinaryIO, chunk: pq.ColumnChunkMetaData, path: Path, column: str,
                       first_row: int) -> list[Page]:
        """The chunk's pages; one above max_cell_bytes is refused naming the file, its rows and the column."""
        start = chunk.data_page_offset
        if chunk.has_dictionary_page and 0 < (chunk.dictionary_page_offset or 0) < start:
            start = chunk.dictionary_page_offset  # the same byte range pyarrow reads
        try:
            pages = chunk_pages(f, start, chunk.total_compressed_size, chunk.num_values)
        except DataError as e:
            raise DataError(f"{path} row {first_row} onwards, column {column!r}: {e}") from None
        rows = sum(p.num_rows for p in pages)
        for page in pages:
            size = max(page.uncompressed_size, page.compressed_size)
            if size > self.max_cell_bytes:
                # a dictionary page serves the whole chunk; a data page its own rows (one when cells are big)
                a, n = (first_row, rows) if page.kind == DICTIONARY_PAGE else (first_row + page.first_row, page.num_rows)
                raise DataError(
                    f"{path} {f'row {a}' if n <= 1 else f'rows {a}-{a + n - 1}'}, column {column!r}: a parquet page of "
                    f"{size} bytes holds this cell, above max_cell_bytes = {self.max_cell_bytes} "
                    "(decompression bomb?); raise max_cell_bytes to read it")
        return pages

    def _reads(self, file: int, group: int, columns: tuple[str, ...], first_row: int) -> Iterator[pa.Table]:
        """The group's rows of these columns, read by blocks of at most BLOCK_BYTES (by the page headers)."""
        rows = self._plan(file, group, columns, first_row)
        handle = self._handle(file)
        try:
            if rows >= handle.metadata.row_group(group).num_rows:
                yield handle.read_row_group(group, columns=list(columns))
                return
            for batch in handle.iter_batches(batch_size=rows, row_groups=[group], columns=list(columns),
                                             use_threads=False):
                yield pa.Table.from_batches([batch])
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{self.files[file]}: row group {group} does not read (corrupt file?): {e}") from None

    def _block(self, group: RowGroup, row: int) -> tuple[pa.Table, int]:
        """The cached block holding `row` of the group, and the block's first row."""
        columns = self.schema.columns
        size = self._plan(group.file, group.group, columns, group.first_row)
        number = row // size
        key = (group.file, group.group, number)
        if key not in self._cache:
            cursor = self._cursor
            if cursor is None or cursor.group != (group.file, group.group) or cursor.next_block > number:
                cursor = self._cursor = _Cursor((group.file, group.group),
                                                self._reads(group.file, group.group, columns, group.first_row))
            while cursor.next_block <= number:  # blocks on the way are cached too: the next rows need them
                self._cache[(group.file, group.group, cursor.next_block)] = next(cursor.blocks)
                cursor.next_block += 1
                while len(self._cache) > 1 and sum(t.nbytes for t in self._cache.values()) > self.cache_bytes:
                    self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key], number * size

    def _example(self, group: RowGroup, row: int) -> PreferenceExample:
        table, start = self._block(group, row)
        values: dict[str, Any] = {c: table.column(c)[row - start].as_py() for c in self.schema.columns}
        path = self.files[group.file]
        example = row_to_example(values, self.schema, f"{path} row {group.first_row + row}", True, path.parent,
                                 self.roots)
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
            captions = [c for block in self._reads(group.file, group.group, ("caption",), group.first_row)
                        for c in block.column("caption").to_pylist()]
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
        state["_handles"], state["_cache"], state["_cursor"] = {}, OrderedDict(), None
        return state


@dataclass
class _Cursor:
    """A read in progress through one row group's blocks (reading on from it costs no re-read)."""

    group: tuple[int, int]
    blocks: Iterator[pa.Table]
    next_block: int = 0
