"""Shared fixtures: an isolated cache folder, tiny SD/SDXL models, tiny preference data."""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("PREFALIGN_CACHE", tempfile.mkdtemp(prefix="prefalign-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per xdist worker: -n 2 on 2 cores; OpenMP threads competing for cores spin and crawl
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)

from trainer.data.records import PreferenceExample  # noqa: E402


def png(rng: np.random.Generator, colour: tuple[int, int, int], size: int = 32) -> bytes:
    pixels = (rng.random((size, size, 3)) * 40).astype(np.uint8) + np.array(colour, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def make_pairs(n: int, seed: int = 0, size: int = 32) -> list[PreferenceExample]:
    """n pairs: a reddish chosen and a bluish rejected image under varied prompts."""
    rng = np.random.default_rng(seed)
    prompts = ["a red square", "a small square", "a square on grey", "a bright square"]
    return [PreferenceExample(prompts[i % len(prompts)], (png(rng, (200, 20, 20), size), png(rng, (20, 20, 200), size)),
                              (1.0, 0.0), f"memory row {i}") for i in range(n)]


def make_unpaired(n: int, seed: int = 0) -> list[PreferenceExample]:
    rng = np.random.default_rng(seed)
    return [PreferenceExample("a square", (png(rng, (200, 20, 20) if i % 2 == 0 else (20, 20, 200)),),
                              (1.0 if i % 2 == 0 else 0.0,), f"memory row {i}") for i in range(n)]


@pytest.fixture(scope="session")
def pairs() -> list[PreferenceExample]:
    return make_pairs(8)


def tiny_config(tmp_path: Path, **overrides):
    from trainer.config import make_config

    values = dict(model="tiny-sd", data="tiny", resolution=32, batch_size=2, max_steps=4, learning_rate=1e-3, rank=4, alpha=4.0,
                  output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), checkpoint_every=0, seed=0,
                  log_every=1)
    values.update(overrides)
    return make_config(values)


def fixed_batch_losses(backend, method_name: str, examples, steps: int = 20, lr: float = 1e-2,
                       options: dict | None = None, resolution: int = 32) -> list[float]:
    """Losses of `steps` Adam steps on one batch with one fixed noise/timestep draw (the whole model stack)."""
    import torch

    from trainer.data.dataset import collate
    from trainer.data.transforms import ImageTransform
    from trainer.encoding import encode_collated
    from trainer.methods import build_method
    from trainer.step import compute_outputs, draw_noise

    method = build_method(method_name, options)
    transform = ImageTransform(resolution)
    batch = encode_collated(backend, collate([transform(e, False, None) for e in examples]))
    noise = draw_noise(method, batch.latents.shape, batch.paired, backend.timestep_sampling,
                       torch.Generator().manual_seed(1234))
    params = backend.trainable_parameters()
    optimizer = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss, _ = method.loss(compute_outputs(backend, method, batch, noise))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """A random CLIP (32-wide towers, 32-pixel images) with the char-level tokenizer, saved like a hub model:
    it stands in for PickScore / CLIP judges."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from trainer.models.tiny import write_char_tokenizer

    folder = tmp_path_factory.mktemp("clip")
    vocab = write_char_tokenizer(folder / "tok")
    tok = CLIPTokenizer(str(folder / "tok" / "vocab.json"), str(folder / "tok" / "merges.txt"), model_max_length=32)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=32, bos_token_id=vocab - 2,
                         eos_token_id=vocab - 1, pad_token_id=vocab - 1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(config).eval().save_pretrained(folder / "clip")
    tok.save_pretrained(folder / "clip")
    return str(folder / "clip")
