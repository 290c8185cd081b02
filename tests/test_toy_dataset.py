"""The toy preference-dataset writer."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from trainer.toy.dataset import open_prompts, write_preference_dataset
from trainer.toy.scoring import classify, has_attribute
from trainer.toy.world import attribute_kind


@pytest.mark.parametrize("attribute", ["shaded", "red", "triangle"])
def test_pairs_differ_only_in_the_attribute(tmp_path, attribute):
    folder = write_preference_dataset(tmp_path / "data", attribute, n_pairs=12, seed=0)
    rows = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    prompts = open_prompts(attribute)
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected"} and row["prompt"] in prompts
        chosen, rejected = (Image.open(folder / row[k]) for k in ("chosen", "rejected"))
        assert chosen.size == rejected.size == (32, 32)
        assert has_attribute(chosen, attribute) and not has_attribute(rejected, attribute)
        a, b = classify(chosen), classify(rejected)
        assert sum(a[k] != b[k] for k in a) == 1  # everything else is the same
        assert all(a[k] in row["prompt"].split() for k in a if k != attribute_kind(attribute))  # caption names the rest


def test_writer_is_deterministic(tmp_path):
    a = write_preference_dataset(tmp_path / "a", "shaded", n_pairs=4, seed=7)
    b = write_preference_dataset(tmp_path / "b", "shaded", n_pairs=4, seed=7)
    c = write_preference_dataset(tmp_path / "c", "shaded", n_pairs=4, seed=8)
    assert (a / "pairs.jsonl").read_text() == (b / "pairs.jsonl").read_text()
    files = sorted(p.relative_to(a) for p in (a / "images").iterdir())
    assert len(files) == 8
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)


def test_open_prompts_leave_the_attribute_open():
    prompts = open_prompts("shaded")
    assert len(prompts) == 12 and "a red circle" in prompts
    assert not any("shaded" in p or "flat" in p for p in prompts)
    assert "a shaded square" in open_prompts("green")
    with pytest.raises(ValueError):
        write_preference_dataset("unused", "purple", 1, 0)
