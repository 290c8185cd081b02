"""Streaming access: shard by shard with a bounded shuffle buffer, sharded across ranks and
DataLoader workers, with an exact resume position.

Each epoch the shards (parquet row groups, or a Hugging Face dataset's shards) are put in a
seeded random order; rank r takes every world_size-th shard, and DataLoader worker w of W every
W-th of those. A worker reads its shards in order into blocks of `buffer_size` examples (ties
dropped), shuffles each block with a seed derived from where the block starts, and yields it.
Memory is bounded by one block per worker. The position after an example is
(epoch, shard, row, offset): the block starts at `row` of the worker's `shard`-th shard and
`offset` of its examples were yielded. Resuming re-reads that one block and skips `offset`.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from .base import DataStats, MapSource, StreamSource
from .dataset import collate
from .errors import BadImageError, DataError
from .records import PreferenceExample
from .transforms import ImageTransform


@dataclass(frozen=True)
class StreamPosition:
    epoch: int = 0
    shard: int = 0
    row: int = 0
    offset: int = 0


class StreamingPreferenceDataset(IterableDataset):
    """Yields collated batches (see `collate`) forever, each with a `stream` entry holding the
    worker, its position after the batch, and the rows read and ties dropped since the last one.
    Use it through `ResumableLoader`, which turns those entries into a resumable state."""

    def __init__(
        self,
        source: StreamSource,
        transform: ImageTransform,
        *,
        seed: int,
        batch_size: int,
        random_flip: bool = False,
        buffer_size: int = 1000,
        rank: int = 0,
        world_size: int = 1,
        skip_bad_rows: bool = False,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        if batch_size < 1 or buffer_size < 1:
            raise ValueError("batch_size and buffer_size must be at least 1")
        self.source, self.transform = source, transform
        self.seed, self.batch_size, self.random_flip, self.buffer_size = seed, batch_size, random_flip, buffer_size
        self.rank, self.world_size, self.skip_bad_rows = rank, world_size, skip_bad_rows
        self.resume_positions: dict[int, StreamPosition] = {}
        self.rotation = 0

    def shard_order(self, epoch: int, worker: int = 0, num_workers: int = 1) -> list[int]:
        """The shards one worker of this rank reads in an epoch, in order."""
        total = self.source.num_shards()
        if total < self.world_size * num_workers:
            raise DataError(
                f"{self.source.name}: {total} shards (row groups / files) cannot feed "
                f"{self.world_size} ranks x {num_workers} workers; use fewer workers or smaller row groups"
            )
        order = np.random.default_rng([self.seed, epoch]).permutation(total)
        return [int(s) for s in order[self.rank :: self.world_size][worker::num_workers]]

    def examples(
        self, worker: int = 0, num_workers: int = 1, start: StreamPosition | None = None, stats: DataStats | None = None
    ) -> Iterator[tuple[PreferenceExample, bool, int, StreamPosition]]:
        """(example, flip, crop seed, position after it) for one worker, forever from `start`."""
        stats = stats if stats is not None else DataStats()
        count_rows = not isinstance(self.source, MapSource)  # indexed sources counted at open
        resumed, start = start is not None, start or StreamPosition()
        epoch = start.epoch
        while True:
            shards = self.shard_order(epoch, worker, num_workers)
            resuming = resumed and epoch == start.epoch
            k, row, skip = (start.shard, start.row, start.offset) if epoch == start.epoch else (0, 0, 0)
            yielded = False
            while k < len(shards):
                block_shard, block_row = k, row
                block: list[PreferenceExample] = []
                block_stats = DataStats()
                while len(block) < self.buffer_size and k < len(shards):
                    for entry in self.source.read_shard(shards[k], row):
                        row += 1
                        block_stats.rows_read += 1
                        if entry is None:
                            block_stats.ties_dropped += 1
                            continue
                        block.append(entry)
                        if len(block) == self.buffer_size:
                            break
                    else:
                        k, row = k + 1, 0
                if count_rows and not (resuming and skip):
                    stats.add(block_stats)
                rng = np.random.default_rng([self.seed, epoch, shards[block_shard], block_row])
                order = rng.permutation(len(block))
                flips = rng.random(len(block)) < 0.5 if self.random_flip else np.zeros(len(block), dtype=bool)
                crop_seeds = rng.integers(0, 2**63 - 1, size=len(block))
                for j in range(skip, len(block)):
                    done = j + 1 == len(block)
                    after = StreamPosition(epoch, k, row, 0) if done else StreamPosition(epoch, block_shard, block_row, j + 1)
                    yielded = True
                    yield block[order[j]], bool(flips[j]), int(crop_seeds[j]), after
                skip = 0
            if not yielded and not resuming:
                raise DataError(
                    f"{self.source.name}: worker {worker} of rank {self.rank} found no examples in a whole epoch of "
                    f"its {len(shards)} shards (every row dropped as a tie?); use fewer workers or ranks"
                )
            epoch += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = (physical + self.rotation) % num_workers
        stats, reported, items = DataStats(), DataStats(), []
        for example, flip, crop_seed, after in self.examples(worker, num_workers, self.resume_positions.get(worker), stats):
            try:
                items.append(self.transform(example, flip, random.Random(crop_seed)))
            except BadImageError:
                if not self.skip_bad_rows:
                    raise
                stats.bad_rows_skipped += 1
            if len(items) == self.batch_size:
                batch = collate(items)
                batch["skipped"] = stats.bad_rows_skipped - reported.bad_rows_skipped
                batch["stream"] = {"worker": worker, "position": asdict(after),
                                   "rows_read": stats.rows_read - reported.rows_read,
                                   "ties_dropped": stats.ties_dropped - reported.ties_dropped}
                yield batch
                reported, items = DataStats(**stats.as_dict()), []
