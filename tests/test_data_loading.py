"""Datasets, collate, samplers, streaming and resumable loaders."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from trainer.data import (
    DataError, DataSpec, ImageTransform, PreferenceDataset, ProcessedExample, ResumableSampler,
    StreamingPreferenceDataset, collate, make_loader, open_examples,
)
from trainer.data.grouping import related_groups
from trainer.data.synthetic import pickapic_rows, write_parquet


def parquet(tmp_path: Path, num_rows: int = 40, row_group_size: int = 5, tie_every: int = 0) -> Path:
    return write_parquet(tmp_path / "d.parquet", pickapic_rows(num_rows, size=16, tie_every=tie_every), row_group_size)


def take(iterable, n):
    return list(itertools.islice(iterable, n))


def test_dataset_keys_collate_and_deterministic_random_crop(tmp_path):
    source = open_examples(DataSpec(str(parquet(tmp_path))))
    dataset = PreferenceDataset(source, ImageTransform(8, center_crop=False), seed=3)
    a, b = dataset[(4, True)], dataset[(4, True)]
    assert torch.equal(a.pixels, b.pixels) and a.source.endswith("row 4")
    assert not torch.equal(dataset[(4, False)].pixels, a.pixels)
    batch = collate([dataset[(i, False)] for i in range(3)])
    assert batch["pixels"].shape == (3, 2, 3, 8, 8) and batch["time_ids"].shape == (3, 2, 6)
    assert batch["labels"].tolist() == [[1.0, 0.0]] * 3 and batch["prompts"][1] == source[1].prompt
    assert batch["skipped"] == 0


def test_collate_refuses_mixed_pairs_and_unpaired():
    def item(k):
        return ProcessedExample("p", torch.zeros(k, 3, 4, 4), torch.zeros(k, 6), torch.zeros(k), f"row {k}")
    with pytest.raises(DataError, match="mixes pairs and unpaired"):
        collate([item(2), item(1)])
    assert collate([item(1), None])["skipped"] == 1


def test_bad_image_stops_or_is_skipped_and_counted(tmp_path):
    rows = pickapic_rows(6, size=16)
    rows[2]["jpg_1"] = b"broken"
    path = write_parquet(tmp_path / "d.parquet", rows)
    source = open_examples(DataSpec(str(path)))
    with pytest.raises(DataError, match=rf"{path} row 2 \(rejected image\): image does not decode"):
        PreferenceDataset(source, ImageTransform(8), 0)[(2, False)]
    loader = make_loader(source, ImageTransform(8), seed=0, batch_size=6, skip_bad_rows=True)
    batch = next(iter(loader))
    assert len(batch["prompts"]) == 5 and loader.stats.bad_rows_skipped == 1
    stream = make_loader(source, ImageTransform(8), seed=0, batch_size=5, skip_bad_rows=True, streaming=True)
    assert all(not s.endswith("row 2") for s in next(iter(stream))["sources"]) and stream.stats.bad_rows_skipped == 1


def test_sampler_is_deterministic_and_covers_each_epoch():
    keys = take(ResumableSampler(10, seed=1, random_flip=True), 30)
    assert keys == take(ResumableSampler(10, seed=1, random_flip=True), 30)
    assert keys != take(ResumableSampler(10, seed=2, random_flip=True), 30)
    for epoch in range(3):
        assert sorted(r for r, _ in keys[epoch * 10 : (epoch + 1) * 10]) == list(range(10))
    assert keys[:10] != keys[10:20] and {f for _, f in keys} == {True, False}
    assert not any(f for _, f in take(ResumableSampler(10, seed=1, random_flip=False), 10))


@pytest.mark.parametrize("consumed", [0, 7, 10, 23])
def test_sampler_resumes_exactly(consumed):
    first = ResumableSampler(10, seed=5, random_flip=True)
    stream = iter(first)
    take(stream, consumed)
    state = first.state_dict()
    assert (state["epoch"], state["index"]) == divmod(consumed, 10)
    expected = take(stream, 15)
    second = ResumableSampler(10, seed=5, random_flip=True)
    second.load_state_dict(state)
    assert take(second, 15) == expected
    with pytest.raises(ValueError, match="num_rows=10 but this run has 11"):
        ResumableSampler(11, seed=5, random_flip=True).load_state_dict(state)


def test_ranks_take_their_slice_of_each_global_batch(tmp_path):
    """3 ranks with batch 2 load exactly what 1 process with batch 6 loads, each its own third."""
    source = open_examples(DataSpec(str(parquet(tmp_path, 20, 5))))
    kw = dict(seed=0, random_flip=True)
    whole = take(make_loader(source, ImageTransform(8), batch_size=6, **kw), 4)  # crosses an epoch of 20
    per_rank = [take(make_loader(source, ImageTransform(8), batch_size=2, rank=r, world_size=3, **kw), 4)
                for r in range(3)]
    for step in range(4):
        assert sum((per_rank[r][step]["sources"] for r in range(3)), []) == whole[step]["sources"]
        assert torch.equal(torch.cat([per_rank[r][step]["pixels"] for r in range(3)]), whole[step]["pixels"])


def test_a_data_error_in_a_worker_arrives_as_its_own_line(tmp_path):
    rows = pickapic_rows(6, size=16)
    rows[3]["jpg_0"] = b"broken"
    source = open_examples(DataSpec(str(write_parquet(tmp_path / "d.parquet", rows))))
    with pytest.raises(DataError) as e:
        take(make_loader(source, ImageTransform(8), seed=0, batch_size=3, num_workers=2), 2)
    assert str(e.value).startswith(f"{tmp_path / 'd.parquet'} row 3 (rejected image): image does not decode")  # jpg_1 won
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)


def test_related_prompts_batches_share_a_topic():
    topics = ["corgi", "castle", "nebula", "lighthouse", "samurai"]
    prompts = [f"a photo of a {topics[i % 5]} variant {i}, highly detailed" for i in range(40)]
    sampler = ResumableSampler(40, seed=0, random_flip=False, related_prompts=True, prompts=prompts, group_size=4)
    keys = take(sampler, 80)
    for start in range(0, 80, 4):
        batch_topics = {topics[row % 5] for row, _ in keys[start : start + 4]}
        assert len(batch_topics) == 1
    assert sorted(r for r, _ in keys[:40]) == list(range(40))
    assert [r for r, _ in keys[:40]] != [r for r, _ in keys[40:]]
    plain = take(ResumableSampler(40, seed=0, random_flip=False), 40)
    assert any(len({topics[r % 5] for r, _ in plain[s : s + 4]}) > 1 for s in range(0, 40, 4))


def test_related_groups_use_the_rarest_shared_word():
    places = ["on a beach", "in snow", "at night", "on a hill", "in fog", "at dawn"]
    prompts = [f"photo of a {('corgi', 'castle')[i // 3]} {place}" for i, place in enumerate(places)] + ["unique"]
    groups, loose = related_groups(prompts, min_size=2)  # "photo" (6 rows) loses to "corgi" / "castle" (3)
    assert sorted(map(list, groups)) == [[0, 1, 2], [3, 4, 5]] and list(loose) == [6]


def stream_dataset(source, **kw) -> StreamingPreferenceDataset:
    args = dict(seed=0, batch_size=1, buffer_size=7, random_flip=True)
    return StreamingPreferenceDataset(source, ImageTransform(8), **(args | kw))


def test_streaming_shuffles_deterministically_within_a_bounded_buffer(tmp_path):
    source = open_examples(DataSpec(str(parquet(tmp_path, 40, 5))))
    rows = [(e.source, f) for e, f, _, _ in take(stream_dataset(source).examples(), 80)]
    assert rows == [(e.source, f) for e, f, _, _ in take(stream_dataset(source).examples(), 80)]
    assert rows != [(e.source, f) for e, f, _, _ in take(stream_dataset(source, seed=1).examples(), 80)]
    assert sorted(s for s, _ in rows[:40]) == sorted(source[i].source for i in range(40))
    assert rows[:40] != rows[40:80]
    in_file_order = [int(s.rsplit(" ", 1)[1]) for s, _ in rows[:40]]
    assert in_file_order != sorted(in_file_order)
    # a block holds 7 rows read from consecutive shards: each window of 7 spans at most 3 row groups of 5
    for start in range(0, 35, 7):
        assert len({r // 5 for r in in_file_order[start : start + 7]}) <= 3


@pytest.mark.parametrize("consumed", [1, 6, 7, 20, 41])
def test_streaming_resumes_exactly(tmp_path, consumed):
    source = open_examples(DataSpec(str(parquet(tmp_path, 40, 5, tie_every=4))))
    stream = stream_dataset(source).examples()
    position = take(stream, consumed)[-1][3]
    expected = [(e.source, f, c) for e, f, c, _ in take(stream, 20)]
    resumed = stream_dataset(source).examples(start=position)
    assert [(e.source, f, c) for e, f, c, _ in take(resumed, 20)] == expected


def test_streaming_ranks_and_workers_are_disjoint_and_cover_an_epoch(tmp_path):
    source = open_examples(DataSpec(str(parquet(tmp_path, 40, 4))))
    seen = []
    for rank in range(2):
        dataset = stream_dataset(source, rank=rank, world_size=2)
        for worker in range(2):
            shards = dataset.shard_order(0, worker, 2)
            n = sum(len(source.groups[s].rows) for s in shards)
            seen.append([e.source for e, *_ in take(dataset.examples(worker, 2), n)])
    flat = [s for part in seen for s in part]
    assert len(flat) == len(set(flat)) == 40 and all(seen)
    with pytest.raises(DataError, match="10 shards .* cannot feed 2 ranks x 6 workers"):
        stream_dataset(source, world_size=2).shard_order(0, 0, 6)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_streaming_hf_source_with_workers_counts_ties_and_covers_an_epoch(tmp_path, monkeypatch, num_workers):
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    rows = pickapic_rows(24, size=16, tie_every=3)
    write_parquet(tmp_path / "hub" / "train-0.parquet", rows[:12])
    write_parquet(tmp_path / "hub" / "train-1.parquet", rows[12:])
    source = open_examples(DataSpec(f"hf:{tmp_path / 'hub'}", streaming=True))
    loader = make_loader(source, ImageTransform(8), seed=0, batch_size=4, num_workers=num_workers)
    batches = take(loader, 4)
    prompts = sorted(p for b in batches for p in b["prompts"])
    assert prompts == sorted(r["caption"] for i, r in enumerate(rows) if i % 3 != 2)
    assert loader.stats.ties_dropped == 8 and loader.stats.rows_read == 24


def _sources(batches):
    return [s for b in batches for s in b["sources"]]


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resumes_exactly_despite_prefetch(tmp_path, streaming, num_workers):
    source = open_examples(DataSpec(str(parquet(tmp_path, 40, 5, tie_every=5))))
    kw = dict(seed=4, batch_size=3, num_workers=num_workers, streaming=streaming, random_flip=True, buffer_size=6)
    loader = make_loader(source, ImageTransform(8), **kw)
    batches = iter(loader)
    take(batches, 5)
    state = loader.state_dict()
    expected = take(batches, 6)
    del batches
    resumed = make_loader(source, ImageTransform(8), **kw)
    resumed.load_state_dict(state)
    got = take(resumed, 6)
    assert _sources(got) == _sources(expected)
    assert all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(got, expected))
    assert resumed.stats.ties_dropped == 8


def test_related_prompts_refuse_streaming(tmp_path):
    source = open_examples(DataSpec(str(parquet(tmp_path))))
    with pytest.raises(ValueError, match="related_prompts"):
        make_loader(source, ImageTransform(8), seed=0, batch_size=2, related_prompts=True, streaming=True)
    batch = next(iter(make_loader(source, ImageTransform(8), seed=0, batch_size=4, related_prompts=True)))
    assert len(batch["prompts"]) == 4
