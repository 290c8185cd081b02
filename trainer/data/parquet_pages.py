"""The page headers of a parquet column chunk, read without decompressing anything.

A parquet reader allocates, for every page, the `uncompressed_page_size` its header states, then
copies the decoded values out of it. The column chunk statistics in the footer are only a writer's
claim, but the page header is what the reader trusts, so checking every page header before the
column is read bounds what reading it can cost: a 60 KB zstd file holding two 1 GB zero cells has
two pages whose headers say 1 GB. (A header that understates its page does not get past pyarrow:
it decompresses into a buffer of the stated size and refuses a page that does not fit.)

Headers are Thrift compact-protocol structs (parquet-format's parquet.thrift):

    struct PageHeader { 1: PageType type  2: i32 uncompressed_page_size  3: i32 compressed_page_size
                        4: i32 crc  5: DataPageHeader  6: IndexPageHeader  7: DictionaryPageHeader
                        8: DataPageHeaderV2 }
    struct DataPageHeader { 1: i32 num_values  2: Encoding encoding ... }
    struct DictionaryPageHeader { 1: i32 num_values ... }
    struct DataPageHeaderV2 { 1: i32 num_values  2: i32 num_nulls  3: i32 num_rows  4: Encoding encoding ... }
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

from .errors import DataError

DATA_PAGE, DICTIONARY_PAGE, DATA_PAGE_V2 = 0, 2, 3  # PageType (1, INDEX_PAGE, is never written)
_DICTIONARY_ENCODINGS = (2, 8)  # PLAIN_DICTIONARY, RLE_DICTIONARY: values are indices into the dictionary page
#: pyarrow gives up on a page header longer than this (its kDefaultMaxPageHeaderSize); so do we.
MAX_HEADER_BYTES = 16 * 2**20
_FIRST_READ = 64 * 2**10
_MAX_DEPTH = 16  # a PageHeader nests 3 deep (header > data page header > statistics)

# compact-protocol field types
_TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(1, 13)


class _Truncated(Exception):
    """The buffer ended inside the header: read more of the file."""


class _Corrupt(Exception):
    """Bytes that are no Thrift compact struct."""


class _CompactReader:
    """Just enough of the Thrift compact protocol to read a struct's integer fields and skip the rest."""

    def __init__(self, buf: bytes) -> None:
        self.buf, self.pos = buf, 0

    def _byte(self) -> int:
        if self.pos >= len(self.buf):
            raise _Truncated
        self.pos += 1
        return self.buf[self.pos - 1]

    def _varint(self) -> int:
        value = shift = 0
        while True:
            b = self._byte()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7
            if shift > 63:
                raise _Corrupt("varint longer than 10 bytes")

    def _zigzag(self) -> int:
        n = self._varint()
        return (n >> 1) ^ -(n & 1)

    def _skip_bytes(self, n: int) -> None:
        if n < 0:
            raise _Corrupt("negative length")
        if self.pos + n > len(self.buf):
            raise _Truncated
        self.pos += n

    def struct(self, depth: int = 0) -> dict[int, object]:
        """Field id -> int, bool or nested dict; binaries, lists, sets and maps are skipped."""
        if depth > _MAX_DEPTH:
            raise _Corrupt("structs nested too deeply")
        fields: dict[int, object] = {}
        last = 0
        while True:
            head = self._byte()
            kind = head & 0x0F
            if kind == 0:
                return fields
            delta = head >> 4
            last = last + delta if delta else self._zigzag()
            fields[last] = self._value(kind, depth)

    def _value(self, kind: int, depth: int) -> object:
        if kind in (_TRUE, _FALSE):
            return kind == _TRUE
        if kind == _BYTE:
            return self._byte()
        if kind in (_I16, _I32, _I64):
            return self._zigzag()
        if kind == _DOUBLE:
            self._skip_bytes(8)
            return None
        if kind == _BINARY:
            self._skip_bytes(self._varint())
            return None
        if kind in (_LIST, _SET):
            head = self._byte()
            size = head >> 4 if head >> 4 != 15 else self._varint()
            for _ in range(size):
                self._element(head & 0x0F, depth)
            return None
        if kind == _MAP:
            size = self._varint()
            if size:
                types = self._byte()
                for _ in range(size):
                    self._element(types >> 4, depth)
                    self._element(types & 0x0F, depth)
            return None
        if kind == _STRUCT:
            return self.struct(depth + 1)
        raise _Corrupt(f"unknown field type {kind}")

    def _element(self, kind: int, depth: int) -> None:
        if kind in (_TRUE, _FALSE):  # inside a container a bool takes one byte
            self._byte()
        else:
            self._value(kind, depth)


@dataclass(frozen=True)
class Page:
    """One page of a column chunk; rows are counted from the chunk's first row. A dictionary page
    holds no rows of its own: it serves every dictionary-encoded data page of the chunk."""

    kind: int
    first_row: int
    num_rows: int
    uncompressed_size: int
    compressed_size: int
    dictionary_encoded: bool = False

    @property
    def is_data(self) -> bool:
        return self.kind in (DATA_PAGE, DATA_PAGE_V2)


def _header(f: BinaryIO, offset: int, end: int) -> tuple[dict[int, object], int]:
    """The PageHeader at `offset` and its length in bytes."""
    size = _FIRST_READ
    while True:
        f.seek(offset)
        buf = f.read(min(size, end - offset))
        try:
            reader = _CompactReader(buf)
            return reader.struct(), reader.pos
        except _Truncated:
            if len(buf) < min(size, end - offset) or offset + len(buf) >= end or size >= MAX_HEADER_BYTES:
                raise _Corrupt("the header runs past the column chunk") from None
            size *= 4


def chunk_pages(f: BinaryIO, start: int, length: int, num_values: int) -> list[Page]:
    """Every page of the column chunk stored at [start, start + length), as pyarrow reads it: page
    after page until the chunk's `num_values` have been seen or its bytes end."""
    pages: list[Page] = []
    offset, end, seen, row = start, start + length, 0, 0
    while offset < end and seen < num_values:
        try:
            header, header_len = _header(f, offset, end)
        except _Corrupt as e:
            raise DataError(f"page header at byte {offset} is corrupt ({e})") from None
        kind, uncompressed, compressed = header.get(1), header.get(2), header.get(3)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (kind, uncompressed, compressed)) or \
                min(uncompressed, compressed) < 0:  # type: ignore[type-var]
            raise DataError(f"page header at byte {offset} is corrupt (no valid type and sizes)")
        if kind not in (DATA_PAGE, DICTIONARY_PAGE, DATA_PAGE_V2):
            raise DataError(f"page at byte {offset} has unsupported page type {kind}")
        if kind == DICTIONARY_PAGE and pages:
            raise DataError(f"page at byte {offset} is a dictionary page after the first page of the chunk")
        sub = header.get({DATA_PAGE: 5, DICTIONARY_PAGE: 7, DATA_PAGE_V2: 8}[kind])  # type: ignore[index]
        sub = sub if isinstance(sub, dict) else {}
        values = sub.get(1, 0)
        rows, encoding = (sub.get(3, values), sub.get(4)) if kind == DATA_PAGE_V2 else (values, sub.get(2))
        if not isinstance(rows, int) or not isinstance(values, int) or rows < 0 or values < 0:
            raise DataError(f"page header at byte {offset} is corrupt (negative value count)")
        page = Page(kind, row, rows if kind != DICTIONARY_PAGE else 0,  # type: ignore[arg-type]
                    uncompressed, compressed, encoding in _DICTIONARY_ENCODINGS)  # type: ignore[arg-type]
        if page.is_data:
            if values == 0:  # every page makes progress, so a chunk has at most num_values + 1 pages
                raise DataError(f"page header at byte {offset} is corrupt (a data page without values)")
            seen, row = seen + values, row + rows
        pages.append(page)
        offset += header_len + compressed  # type: ignore[operator]
    return pages


def read_cost(pages: list[Page], value_width: int | None) -> tuple[int, int]:
    """Upper bounds of the bytes reading a chunk's values materialises: (all rows, any one row).

    Fixed-width values (`value_width`) cost their width; a dictionary-encoded value at most the
    whole dictionary page (a small page can repeat one huge entry on every row); a plain value
    at most its page. Each row adds 8 bytes of offsets and validity."""
    dictionary = sum(p.uncompressed_size for p in pages if p.kind == DICTIONARY_PAGE)
    total = row_max = 0
    for p in pages:
        if not p.is_data:
            continue
        per_row = value_width if value_width is not None else dictionary if p.dictionary_encoded else p.uncompressed_size
        total += 8 * p.num_rows + (per_row * p.num_rows if value_width is not None or p.dictionary_encoded else per_row)
        row_max = max(row_max, per_row + 8)
    return total, row_max
