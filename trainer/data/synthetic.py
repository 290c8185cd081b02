"""Small synthetic Pick-a-Pic data, for tests, benchmarks and smoke runs."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

SUBJECTS = ("cat", "dog", "castle", "forest", "robot", "ship", "mountain", "city")
STYLES = ("oil painting", "photo", "pixel art", "watercolor")


def encode(image: Image.Image, format: str = "JPEG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def noise_jpegs(count: int, size: int, seed: int = 0) -> list[bytes]:
    """`count` distinct size x size JPEGs of smooth random colour."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        images.append(encode(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC), quality=90))
    return images


def pickapic_rows(num_rows: int, size: int = 64, seed: int = 0, tie_every: int = 0, distinct_images: int = 64) -> list[dict[str, Any]]:
    """Rows in the Pick-a-Pic schema; label_0 alternates 1, 0 and every `tie_every`-th row is a tie."""
    images = noise_jpegs(min(distinct_images, 2 * num_rows), size, seed)
    rows = []
    for i in range(num_rows):
        label_0 = 0.5 if tie_every and i % tie_every == tie_every - 1 else float(i % 2 == 0)
        rows.append({
            "caption": f"a {STYLES[i % len(STYLES)]} of a {SUBJECTS[(i // len(STYLES)) % len(SUBJECTS)]} number {i}",
            "jpg_0": images[(2 * i) % len(images)],
            "jpg_1": images[(2 * i + 1) % len(images)],
            "label_0": label_0,
            "label_1": 1.0 - label_0,
            "best_image_uid": f"uid-{i}",
        })
    return rows


def write_parquet(path: str | Path, rows: Sequence[dict[str, Any]], row_group_size: int = 100) -> Path:
    """Write rows (image columns as binary) to one parquet file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    types = {key: pa.binary() for key, values in columns.items() if isinstance(values[0], bytes)}
    table = pa.table({k: pa.array(v, type=types.get(k)) for k, v in columns.items()})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path
