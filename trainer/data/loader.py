"""Batches for the training loop, with an exact resume position and the data counters."""
from __future__ import annotations

from collections import deque
from typing import Any, Iterator

from torch.utils.data import DataLoader, Sampler

from .base import DataStats, ExampleSource, MapSource
from .dataset import Key, PreferenceDataset, ResumableSampler, collate
from .streaming import StreamingPreferenceDataset, StreamPosition
from .transforms import ImageTransform


class _RecordingSampler(Sampler[Key]):
    """Passes keys through and queues the sampler state after each full batch of keys."""

    def __init__(self, sampler: ResumableSampler, batch_size: int, states: deque):
        self.sampler, self.batch_size, self.states = sampler, batch_size, states

    def __iter__(self) -> Iterator[Key]:
        for count, key in enumerate(self.sampler, start=1):
            if count % self.batch_size == 0:
                self.states.append(self.sampler.state_dict())
            yield key


class ResumableLoader:
    """Iterates batch dicts (see `collate`) forever, map-style or streaming.

    `state_dict()` is the position after the last batch handed out, however far the DataLoader's
    workers have read ahead; `load_state_dict()` (before iterating) continues from exactly there,
    without reading the skipped data. `stats` are the source's counters plus those met on the way.
    A streaming state needs the same number of workers to resume.
    """

    def __init__(
        self,
        dataset: PreferenceDataset | StreamingPreferenceDataset,
        *,
        batch_size: int,
        sampler: ResumableSampler | None = None,
        num_workers: int = 0,
        stats: DataStats | None = None,
    ):
        self.dataset, self.batch_size, self.sampler, self.num_workers = dataset, batch_size, sampler, num_workers
        self.stats = DataStats()
        self.stats.add(stats or DataStats())
        self._pending: deque = deque()
        self._sampler_state = sampler.state_dict() if sampler is not None else None
        self._positions: dict[int, dict[str, int]] = {}
        self._batches = 0

    def _loader(self) -> DataLoader:
        if self.sampler is not None:
            self.sampler.load_state_dict(self._sampler_state)
            self._pending.clear()
            return DataLoader(self.dataset, batch_size=self.batch_size, collate_fn=collate, num_workers=self.num_workers,
                              sampler=_RecordingSampler(self.sampler, self.batch_size, self._pending))
        assert isinstance(self.dataset, StreamingPreferenceDataset)
        self.dataset.resume_positions = {w: StreamPosition(**p) for w, p in self._positions.items()}
        self.dataset.rotation = self._batches % max(1, self.num_workers)
        return DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self._loader():
            self.stats.bad_rows_skipped += batch.pop("skipped")
            if self.sampler is not None:
                self._sampler_state = self._pending.popleft()
            else:
                stream = batch.pop("stream")
                self._positions[stream["worker"]] = stream["position"]
                self.stats.rows_read += stream["rows_read"]
                self.stats.ties_dropped += stream["ties_dropped"]
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"batches": self._batches, "stats": self.stats.as_dict()}
        if self.sampler is not None:
            state["sampler"] = dict(self._sampler_state)
        else:
            state["num_workers"] = self.num_workers
            state["positions"] = {str(w): dict(p) for w, p in self._positions.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
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
    source: ExampleSource,
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
) -> ResumableLoader:
    """The loader for a source: random access with `ResumableSampler` for map-style sources,
    shard-by-shard streaming for stream sources or when `streaming` is set."""
    if not isinstance(source, MapSource) or streaming:
        if related_prompts:
            raise ValueError("related_prompts needs random access to every prompt; it does not work with streaming")
        dataset = StreamingPreferenceDataset(
            source, transform, seed=seed, batch_size=batch_size, random_flip=random_flip, buffer_size=buffer_size,
            rank=rank, world_size=world_size, skip_bad_rows=skip_bad_rows,
        )
        return ResumableLoader(dataset, batch_size=batch_size, num_workers=num_workers, stats=source.stats)
    sampler = ResumableSampler(
        len(source), seed, random_flip, related_prompts,
        prompts=source.prompts() if related_prompts else None, group_size=batch_size, rank=rank, world_size=world_size,
    )
    dataset = PreferenceDataset(source, transform, seed, skip_bad_rows)
    return ResumableLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, stats=source.stats)
