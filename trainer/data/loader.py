"""Batches with an exact resume position and the data counters: the one loader training and the
benchmarks use.

Map-style: a `ResumableSampler` over every row draws each *global* batch of keys (batch_size x
world_size) and each rank keeps its own slice, so W processes with batch B see exactly the data of
one process with batch W*B. A DataLoader fetches the slices (decoding in `num_workers` processes that
read ahead); the batch sampler queues the sampler's position after each batch it hands to the
DataLoader, so `state_dict()` is the position after the last batch *handed out*, however far the
workers have read. Streaming: shard by shard (see streaming.py), with a position per worker.
"""
from __future__ import annotations

import itertools
from collections import deque
from typing import Any, Callable, Iterator, Sequence

from torch.utils.data import DataLoader, Dataset, Sampler

from .base import DataStats, StreamSource
from .dataset import Key, PreferenceDataset, ResumableSampler, collate
from .errors import DataError
from .records import PreferenceExample
from .streaming import StreamingPreferenceDataset, StreamPosition
from .transforms import ImageTransform


class KeyBatches(Sampler[list[Key]]):
    """A DataLoader batch sampler: this rank's keys of each global batch, forever. After each batch it
    queues the sampler's state (the position after that batch) in `states`."""

    def __init__(self, sampler: ResumableSampler, batch_size: int, rank: int, world_size: int, states: deque):
        self.sampler, self.batch_size, self.rank, self.world_size, self.states = sampler, batch_size, rank, world_size, states

    def __iter__(self) -> Iterator[list[Key]]:
        keys, start = iter(self.sampler), self.rank * self.batch_size
        while True:
            batch = list(itertools.islice(keys, self.batch_size * self.world_size))
            self.states.append(self.sampler.state_dict())
            yield batch[start : start + self.batch_size]


def make_sampler(num_rows: int, seed: int, random_flip: bool, group_size: int,
                 prompts: Sequence[str] | None = None) -> ResumableSampler:
    """The sampler of a map-style run; with `prompts`, each global batch (`group_size` rows) holds related prompts."""
    return ResumableSampler(num_rows, seed, random_flip, prompts is not None, prompts=prompts, group_size=group_size)


def row_prompts(examples: Sequence[PreferenceExample]) -> list[str]:
    """Every row's prompt; a data source answers without reading images."""
    prompts = getattr(examples, "prompts", None)
    return prompts() if callable(prompts) else [e.prompt for e in examples]


def one_line_errors(batches: Iterator[Any]) -> Iterator[Any]:
    """A data error raised in a DataLoader worker arrives wrapped in the worker's traceback text; pass
    on its own message (the file, row and field), as the main process would have raised it."""
    try:
        yield from batches
    except DataError as e:
        text = str(e)
        if "Original Traceback" not in text:
            raise
        last = text.strip().splitlines()[-1]
        raise type(e)(last.split(": ", 1)[1] if ": " in last else last) from None


class ResumableLoader:
    """Iterates batches (see `collate`, or what `collate_fn` makes) forever, map-style or streaming.

    `load_state_dict()` (before iterating) continues from exactly the saved position without reading the
    skipped data. `stats` are the source's counters plus those met on the way (rows skipped as bad).
    A streaming state needs the same number of workers to resume.
    """

    def __init__(
        self,
        dataset: Dataset | StreamingPreferenceDataset,
        *,
        batch_size: int,
        sampler: ResumableSampler | None = None,
        num_workers: int = 0,
        stats: DataStats | None = None,
        rank: int = 0,
        world_size: int = 1,
        collate_fn: Callable[[list], dict[str, Any]] = collate,
        pin_memory: bool = False,
    ):
        self.dataset, self.batch_size, self.sampler, self.num_workers = dataset, batch_size, sampler, num_workers
        self.rank, self.world_size, self.collate_fn, self.pin_memory = rank, world_size, collate_fn, pin_memory
        self.stats = DataStats()
        self.stats.add(stats or DataStats())
        self._pending: deque = deque()
        self._sampler_state = sampler.state_dict() if sampler is not None else None
        self._positions: dict[int, dict[str, int]] = {}
        self._batches = 0
        self._iterator: Iterator | None = None

    def _loader(self) -> DataLoader:
        prefetch = 4 if self.num_workers else None
        if self.sampler is not None:
            self.sampler.load_state_dict(self._sampler_state)
            self._pending.clear()
            batches = KeyBatches(self.sampler, self.batch_size, self.rank, self.world_size, self._pending)
            return DataLoader(self.dataset, batch_sampler=batches, collate_fn=self.collate_fn,
                              num_workers=self.num_workers, pin_memory=self.pin_memory, prefetch_factor=prefetch)
        assert isinstance(self.dataset, StreamingPreferenceDataset)
        self.dataset.resume_positions = {w: StreamPosition(**p) for w, p in self._positions.items()}
        self.dataset.rotation = self._batches % max(1, self.num_workers)
        return DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                          prefetch_factor=prefetch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.close()
        self._iterator = iter(self._loader())
        for batch in one_line_errors(self._iterator):
            self.stats.bad_rows_skipped += batch.pop("skipped", 0)
            if self.sampler is not None:
                self._sampler_state = self._pending.popleft()
            else:
                stream = batch.pop("stream")
                self._positions[stream["worker"]] = stream["position"]
                self.stats.rows_read += stream["rows_read"]
                self.stats.ties_dropped += stream["ties_dropped"]
            self._batches += 1
            yield batch

    def close(self) -> None:
        """Stop the decoding workers now (they would also stop when the iterator is garbage-collected)."""
        iterator, self._iterator = self._iterator, None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"batches": self._batches, "stats": self.stats.as_dict()}
        if self.sampler is not None:
            state["sampler"] = dict(self._sampler_state)
        else:
            state["num_workers"] = self.num_workers
            state["positions"] = {str(w): dict(p) for w, p in self._positions.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.sampler is not None and "sampler" not in state:  # an earlier version saved the sampler's state alone
            state = {"sampler": state, "batches": 0, "stats": self.stats.as_dict()}
        if self.sampler is not None:
            self.sampler.load_state_dict(state["sampler"])
            self._sampler_state = self.sampler.state_dict()
        else:
            if state["num_workers"] != self.num_workers:
                raise ValueError(
                    f"the streaming position was saved with num_workers={state['num_workers']}; "
                    f"resume with the same number (got {self.num_workers})"
                )
            self._positions = {int(w): dict(p) for w, p in state["positions"].items()}
        self._batches = state["batches"]
        self.stats = DataStats(**state["stats"])


def make_loader(
    source: Sequence[PreferenceExample] | StreamSource,
    transform: ImageTransform,
    *,
    seed: int,
    batch_size: int,
    num_workers: int = 0,
    random_flip: bool = False,
    related_prompts: bool = False,
    streaming: bool = False,
    skip_bad_rows: bool = False,
    buffer_size: int = 1000,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> ResumableLoader:
    """The loader for a source of decoded rows: random access with `ResumableSampler` for map-style
    sources (and plain lists of examples), shard-by-shard streaming for stream sources or when
    `streaming` is set. With `skip_bad_rows` a row whose image does not decode is dropped from its
    batch and counted."""
    if streaming or not hasattr(source, "__getitem__"):
        if related_prompts:
            raise ValueError("related_prompts needs random access to every prompt; it does not work with streaming")
        dataset = StreamingPreferenceDataset(
            source, transform, seed=seed, batch_size=batch_size, random_flip=random_flip, buffer_size=buffer_size,
            rank=rank, world_size=world_size, skip_bad_rows=skip_bad_rows,
        )
        return ResumableLoader(dataset, batch_size=batch_size, num_workers=num_workers, stats=source.stats,
                               pin_memory=pin_memory)
    sampler = make_sampler(len(source), seed, random_flip, batch_size * world_size,
                           row_prompts(source) if related_prompts else None)
    return ResumableLoader(PreferenceDataset(source, transform, seed, skip_bad_rows), batch_size=batch_size,
                           sampler=sampler, num_workers=num_workers, stats=getattr(source, "stats", None), rank=rank,
                           world_size=world_size, pin_memory=pin_memory)
