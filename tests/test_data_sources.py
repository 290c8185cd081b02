"""Data sources: parquet, Hugging Face datasets, jsonl folders; labels, ties and errors."""
from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from trainer.data import DataError, DataSpec, MapSource, StreamSource, open_examples
from trainer.data.parquet import ParquetSource
from trainer.data.synthetic import noise_jpegs, pickapic_rows, write_parquet


def rows_with_labels(labels: list[float]) -> list[dict]:
    rows = pickapic_rows(len(labels))
    for row, label in zip(rows, labels):
        row["label_0"], row["label_1"] = label, 1.0 - label
    return rows


def test_parquet_file_winner_first_and_ties_dropped(tmp_path):
    rows = rows_with_labels([1.0, 0.0, 0.5, 1.0])
    source = open_examples(DataSpec(str(write_parquet(tmp_path / "d.parquet", rows, row_group_size=3))))
    assert isinstance(source, MapSource) and len(source) == 3
    assert source.stats.rows_read == 4 and source.stats.ties_dropped == 1
    first, swapped = source[0], source[1]
    assert first.images == (rows[0]["jpg_0"], rows[0]["jpg_1"]) and first.labels == (1.0, 0.0)
    assert swapped.images == (rows[1]["jpg_1"], rows[1]["jpg_0"])  # label_0 == 0: jpg_1 won
    assert source[2].source == f"{tmp_path / 'd.parquet'} row 3"  # the tie (row 2) is gone
    assert source.prompts() == [rows[i]["caption"] for i in (0, 1, 3)]


def test_ties_kept_with_jpg_0_first(tmp_path):
    rows = rows_with_labels([0.5, 0.0])
    source = open_examples(DataSpec(str(write_parquet(tmp_path / "d.parquet", rows)), keep_ties=True))
    assert len(source) == 2 and source.stats.ties_dropped == 0
    assert source[0].images == (rows[0]["jpg_0"], rows[0]["jpg_1"])


def test_folder_of_shards_in_sorted_order_with_limit(tmp_path):
    all_rows = pickapic_rows(10)
    write_parquet(tmp_path / "train-1.parquet", all_rows[6:], row_group_size=2)
    write_parquet(tmp_path / "sub" / "train-0.parquet", all_rows[:6], row_group_size=4)
    source = open_examples(DataSpec(str(tmp_path)))
    assert len(source) == 10 and source.num_shards() == 4
    assert [source[i].prompt for i in range(10)] == [r["caption"] for r in all_rows[:6] + all_rows[6:]]
    assert source[7].source.endswith("train-1.parquet row 1")
    assert len(open_examples(DataSpec(str(tmp_path), limit=5))) == 5


def test_rows_are_read_lazily_a_row_group_at_a_time_within_a_byte_budget(tmp_path):
    source = open_examples(DataSpec(str(write_parquet(tmp_path / "d.parquet", pickapic_rows(12), row_group_size=4))))
    assert len(source._cache) == 0  # opening reads labels only
    source[5]
    source[6]
    assert list(source._cache) == [(0, 1, 0)]  # (file, row group, block): a small row group is one block
    source[0]
    assert list(source._cache) == [(0, 1, 0), (0, 0, 0)]
    source.cache_bytes = 1  # never below one block
    source[9]
    assert list(source._cache) == [(0, 2, 0)]


def test_a_row_group_above_the_block_budget_is_read_in_blocks(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", pickapic_rows(12), row_group_size=12)
    whole, blocked = ParquetSource(path), ParquetSource(path)
    blocked.block_bytes = 1  # every row costs more: one row per block
    assert [blocked[i] for i in range(len(whole))] == [whole[i] for i in range(len(whole))]
    assert len(blocked._cache) == len(whole) and all(t.num_rows == 1 for t in blocked._cache.values())
    assert len(whole._cache) == 1
    blocked._cache.clear()
    assert blocked[7] == whole[7] and blocked[3] == whole[3]  # out of order: read again from the group's start


def test_a_row_group_without_rows_reads(tmp_path):
    path = tmp_path / "d.parquet"
    table = pa.Table.from_pylist(pickapic_rows(3))
    with pq.ParquetWriter(path, table.schema) as writer:
        writer.write_table(table.slice(0, 0))
        writer.write_table(table)
    assert pq.ParquetFile(path).metadata.row_group(0).num_rows == 0
    source = ParquetSource(path, keep_ties=True)
    assert [source[i].prompt for i in range(len(source))] == table.column("caption").to_pylist()


def test_extra_columns_ignored_and_image_struct_accepted(tmp_path):
    rows = pickapic_rows(2)
    for row in rows:
        row["jpg_0"] = {"bytes": row["jpg_0"], "path": None}
        row["model_0"] = "sdxl"
    source = open_examples(DataSpec(str(write_parquet(tmp_path / "d.parquet", rows))))
    assert isinstance(source[0].images[0], bytes) and len(source) == 2


@pytest.mark.parametrize("label_0, label_1", [(0.7, 0.3), (2.0, -1.0), (1.0, 1.0), (0.5, 0.0)])
def test_bad_labels_name_file_and_row(tmp_path, label_0, label_1):
    rows = pickapic_rows(3)
    rows[2]["label_0"], rows[2]["label_1"] = label_0, label_1
    path = write_parquet(tmp_path / "d.parquet", rows)
    with pytest.raises(DataError, match=rf"{path} row 2: label_0="):
        open_examples(DataSpec(str(path)))


def test_missing_column_names_file_and_column(tmp_path):
    rows = pickapic_rows(2)
    for row in rows:
        del row["label_1"]
    path = write_parquet(tmp_path / "d.parquet", rows)
    with pytest.raises(DataError, match=rf"{path}: missing column 'label_1'"):
        open_examples(DataSpec(str(path)))


def test_truncated_parquet_names_the_file(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", pickapic_rows(4))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=rf"{path}: not a readable parquet file"):
        open_examples(DataSpec(str(path)))


def test_empty_after_filtering_gives_counts(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", rows_with_labels([0.5, 0.5, 0.5]))
    with pytest.raises(DataError, match=r"no examples left after filtering \(3 rows read, 3 ties dropped"):
        open_examples(DataSpec(str(path)))


def test_unpaired_parquet(tmp_path):
    images = noise_jpegs(3, 16)
    rows = [{"caption": f"p{i}", "jpg": images[i], "label": label} for i, label in enumerate([1, 0, 1])]
    source = open_examples(DataSpec(str(write_parquet(tmp_path / "u.parquet", rows))))
    assert not source.paired and [source[i].labels for i in range(3)] == [(1.0,), (0.0,), (1.0,)]
    assert source[1].images == (images[1],) and not source[1].is_pair
    rows[1]["label"] = 3
    with pytest.raises(DataError, match=r"u2.parquet row 1: label=3"):
        open_examples(DataSpec(str(write_parquet(tmp_path / "u2.parquet", rows))))


def _image_folder(tmp_path: Path, rows: list[dict], name: str = "pairs.jsonl") -> Path:
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_pairs_jsonl_folder(tmp_path):
    folder = _image_folder(tmp_path, [{"prompt": "a", "chosen": "0.png", "rejected": "1.png"},
                                      {"prompt": "b", "chosen": "3.png", "rejected": "2.png"}])
    source = open_examples(DataSpec(str(folder)))
    assert len(source) == 2 and source.paired
    assert source[1].images == (folder / "3.png", folder / "2.png") and source[1].prompt == "b"


def test_unpaired_jsonl_labels(tmp_path):
    labels = [1, False, "like", "dislike"]
    folder = _image_folder(tmp_path, [{"prompt": "p", "image": f"{i}.png", "label": v} for i, v in enumerate(labels)],
                           "feedback.jsonl")
    source = open_examples(DataSpec(str(folder)))
    assert [source[i].labels[0] for i in range(4)] == [1.0, 0.0, 1.0, 0.0] and not source.paired


def test_jsonl_errors_name_line_and_field(tmp_path):
    folder = _image_folder(tmp_path, [{"prompt": "a", "chosen": "0.png", "rejected": "1.png"},
                                      {"prompt": "b", "chosen": "0.png"}])
    with pytest.raises(DataError, match=r"pairs.jsonl line 2: missing field 'rejected'"):
        open_examples(DataSpec(str(folder)))
    (folder / "pairs.jsonl").write_text(json.dumps({"prompt": "a", "image": "0.png", "label": "maybe"}) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl line 1: label='maybe'"):
        open_examples(DataSpec(str(folder)))


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def test_hf_load_dataset_path_map_and_streaming(tmp_path, hf_cache):
    rows = rows_with_labels([1.0, 0.0, 0.5, 1.0, 0.0, 1.0])
    write_parquet(tmp_path / "hub" / "data" / "train-00000-of-00002.parquet", rows[:3])
    write_parquet(tmp_path / "hub" / "data" / "train-00001-of-00002.parquet", rows[3:])
    source = open_examples(DataSpec(f"hf:{tmp_path / 'hub'}"))
    assert isinstance(source, MapSource) and len(source) == 5 and source.stats.ties_dropped == 1
    assert source[1].images == (rows[1]["jpg_1"], rows[1]["jpg_0"]) and source[1].source.endswith("row 1")
    assert source.prompts()[2] == rows[3]["caption"]
    stream = open_examples(DataSpec(f"hf:{tmp_path / 'hub'}", streaming=True))
    assert isinstance(stream, StreamSource) and not isinstance(stream, MapSource)
    read = [e for s in range(stream.num_shards()) for e in stream.read_shard(s)]
    assert len(read) == 6 and read[2] is None  # the tie, as a row position
    assert [e.prompt for e in read if e] == [rows[i]["caption"] for i in (0, 1, 3, 4, 5)]
    assert list(stream.read_shard(stream.num_shards() - 1, 1))[-1].prompt == rows[-1]["caption"]


def test_hf_saved_dataset_with_image_feature(tmp_path, hf_cache):
    images = noise_jpegs(4, 16)
    ds = datasets.Dataset.from_dict({
        "caption": ["x", "y"], "jpg_0": [{"bytes": images[0], "path": None}, {"bytes": images[2], "path": None}],
        "jpg_1": [images[1], images[3]], "label_0": [0.0, 1.0], "label_1": [1.0, 0.0],
    }).cast_column("jpg_0", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    source = open_examples(DataSpec(str(tmp_path / "saved")))
    assert source[0].images == (images[1], images[0]) and source[1].images == (images[2], images[3])
    missing = datasets.Dataset.from_dict({"caption": ["x"], "jpg_0": [images[0]], "jpg_1": [images[1]], "label_0": [1.0]})
    missing.save_to_disk(str(tmp_path / "missing"))
    with pytest.raises(DataError, match=r"missing column 'label_1'"):
        open_examples(DataSpec(str(tmp_path / "missing")))


def test_unsupported_file_is_refused(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        open_examples(DataSpec(str(tmp_path / "x.csv")))


def test_data_and_model_give_one_hub_refusal(monkeypatch):
    """The sentence for a hub id the hub cannot serve is written once (trainer/hub.py), with each caller's prefix."""
    import trainer.hub
    from trainer.models.loading import check_model_source

    monkeypatch.setattr(trainer.hub, "hub_problem", lambda repo_id, repo_type="model": f"no {repo_type} here")
    with pytest.raises(DataError) as data:
        open_examples(DataSpec("someone/pairs"))
    assert str(data.value) == "someone/pairs is not a local file or folder; as a hub id: no dataset here"
    with pytest.raises(ValueError) as model:
        check_model_source("someone/model")
    assert str(model.value) == "config key 'model': someone/model is not a local file or folder; as a hub id: no model here"


def test_image_paths_may_point_inside_the_dataset_folder_or_the_hub_caches(tmp_path):
    import datasets as hf_datasets
    from huggingface_hub import constants

    from trainer.data.hf import image_places

    file = write_parquet(tmp_path / "parts" / "d.parquet", pickapic_rows(2))
    assert ParquetSource(file).roots == (tmp_path / "parts",)
    assert ParquetSource(tmp_path / "parts").roots == (tmp_path / "parts",)
    assert ParquetSource(file, allow_outside_paths=True).roots is None
    assert image_places(str(tmp_path), False) == (tmp_path, (tmp_path,))
    assert image_places(str(tmp_path), True) == (tmp_path, None)
    hub_caches = (Path(constants.HF_HUB_CACHE), Path(hf_datasets.config.HF_DATASETS_CACHE))
    assert image_places("someone/pairs", False) == (None, hub_caches)
    assert image_places("someone/pairs", True) == (None, None)
