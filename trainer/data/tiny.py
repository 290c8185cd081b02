"""A built-in tiny pair dataset (`--data tiny`): coloured squares, chosen = red, rejected = blue."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic import atomic_dir

PROMPTS = ("a square", "a small square", "a big square", "a square on grey")


def _image(rng: np.random.Generator, colour: tuple[int, int, int], size: int = 32) -> bytes:
    pixels = np.full((size, size, 3), 128, np.uint8)
    lo, hi = sorted(rng.integers(4, size - 4, 2))
    pixels[lo : hi + 4, lo : hi + 4] = colour
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_tiny_dataset(folder: Path, pairs: int = 8, seed: int = 0) -> Path:
    """Write `pairs` pairs as PNGs plus pairs.jsonl into `folder` (idempotent)."""
    if (folder / "pairs.jsonl").exists():
        return folder
    rng = np.random.default_rng(seed)
    with atomic_dir(folder) as tmp:  # concurrent builders (ranks) never see a half-written folder
        rows = []
        for i in range(pairs):
            (tmp / f"{i}-chosen.png").write_bytes(_image(rng, (220, 30, 30)))
            (tmp / f"{i}-rejected.png").write_bytes(_image(rng, (30, 30, 220)))
            rows.append({"prompt": PROMPTS[i % len(PROMPTS)], "chosen": f"{i}-chosen.png", "rejected": f"{i}-rejected.png"})
        (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder
