"""A loss-curve picture (PIL only) for the Train node's IMAGE output."""
from __future__ import annotations

import math
from typing import Sequence

from PIL import Image, ImageDraw

W, H, M = 640, 360, 48


def plot_loss(points: Sequence[tuple[int, float]], title: str = "loss") -> Image.Image:
    img = Image.new("RGB", (W, H), (250, 250, 250))
    d = ImageDraw.Draw(img)
    d.rectangle([M, 16, W - 16, H - M], outline=(60, 60, 60))
    d.text((M, 2), title, fill=(20, 20, 20))
    pts = [(int(s), float(v)) for s, v in points if v is not None and math.isfinite(float(v))]
    if not pts:
        d.text((W // 2 - 40, H // 2), "no steps", fill=(120, 120, 120))
        return img
    s0, s1 = pts[0][0], max(pts[-1][0], pts[0][0] + 1)
    lo, hi = min(v for _, v in pts), max(v for _, v in pts)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    x = lambda s: M + (s - s0) / (s1 - s0) * (W - 16 - M)  # noqa: E731
    y = lambda v: (H - M) - (v - lo) / (hi - lo) * (H - M - 16)  # noqa: E731
    d.text((4, 12), f"{hi:.4g}", fill=(20, 20, 20))
    d.text((4, H - M - 12), f"{lo:.4g}", fill=(20, 20, 20))
    d.text((M, H - M + 6), f"step {s0}", fill=(20, 20, 20))
    d.text((W - 90, H - M + 6), f"step {pts[-1][0]}", fill=(20, 20, 20))
    if len(pts) == 1:
        cx, cy = x(pts[0][0]), y(pts[0][1])
        d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=(30, 90, 200))
    else:
        d.line([(x(s), y(v)) for s, v in pts], fill=(30, 90, 200), width=2)
    return img
