"""What every data source provides: counters, and rows either by index or shard by shard."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Iterator

from .errors import DataError
from .records import PreferenceExample


@dataclass
class DataStats:
    """Counters the training loop logs."""

    rows_read: int = 0
    ties_dropped: int = 0
    bad_rows_skipped: int = 0

    def add(self, other: "DataStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class StreamSource(ABC):
    """Rows read shard by shard (a parquet row group, a Hugging Face shard): the streaming path.

    `read_shard` yields one entry per stored row in a fixed order: the example, or None for a
    row that filtering dropped (a tie), so that a row offset is a stable resume position.
    """

    name: str
    paired: bool
    stats: DataStats

    @abstractmethod
    def num_shards(self) -> int: ...

    @abstractmethod
    def read_shard(self, shard: int, start: int = 0) -> Iterator[PreferenceExample | None]: ...


class MapSource(StreamSource):
    """Random access by row index (after filtering); also readable shard by shard."""

    rows_per_shard = 1000

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __getitem__(self, index: int) -> PreferenceExample: ...

    def prompts(self) -> list[str]:
        """Every row's prompt, without reading images (used to group related prompts)."""
        return [self[i].prompt for i in range(len(self))]

    def num_shards(self) -> int:
        return -(-len(self) // self.rows_per_shard)

    def read_shard(self, shard: int, start: int = 0) -> Iterator[PreferenceExample | None]:
        begin = shard * self.rows_per_shard
        for index in range(begin + start, min(begin + self.rows_per_shard, len(self))):
            yield self[index]

    def _check_not_empty(self) -> None:
        if len(self) == 0:
            s = self.stats
            raise DataError(
                f"{self.name}: no examples left after filtering ({s.rows_read} rows read, "
                f"{s.ties_dropped} ties dropped; keep_ties=True keeps ties)"
            )


ExampleSource = MapSource | StreamSource
