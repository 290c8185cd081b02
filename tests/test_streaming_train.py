"""Training from a stream of parquet row groups: bounded reading, exact resume, every method's data path."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from trainer.data.sources import DataSpec, open_examples
from trainer.data.synthetic import pickapic_rows, write_parquet
from trainer.loop import train
from trainer.run import make_backend


@pytest.fixture(scope="module")
def parquet(tmp_path_factory):
    return write_parquet(tmp_path_factory.mktemp("pq") / "pairs.parquet", pickapic_rows(24, size=32), row_group_size=6)


def run(config, parquet):
    source = open_examples(DataSpec(str(parquet), streaming=True))
    return train(config, make_backend(config, torch.device("cpu")), source)


def test_streamed_training_resumes_exactly(tmp_path, parquet):
    straight = tiny_config(tmp_path / "a", streaming=True, max_steps=4)
    run(straight, parquet)
    run(tiny_config(tmp_path / "b", streaming=True, max_steps=2, checkpoint_every=1), parquet)
    result = run(tiny_config(tmp_path / "b", streaming=True, max_steps=4, checkpoint_every=1, resume="latest"), parquet)
    assert result.steps == 4
    a, b = (load_file(str(tmp_path / x / "out" / "lora.safetensors")) for x in "ab")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_streaming_refuses_a_method_that_needs_related_prompts(tmp_path, parquet):
    with pytest.raises(ValueError, match="random access"):
        run(tiny_config(tmp_path, streaming=True, method="rpo"), parquet)
