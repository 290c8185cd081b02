"""The toy world: one shape per image on a plain background, with a caption.

Attributes: shape (circle, square, triangle), colour (red, green, blue, yellow) and style
(flat: one uniform colour; shaded: lit from the top left, darkening towards the bottom right).
A caption names any subset of them, e.g. "a red circle" leaves the style open.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

SIZE = 32
SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
STYLES = ("flat", "shaded")
ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": COLOURS, "style": STYLES}
RGB = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.10, 0.72, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.98, 0.85, 0.10),
}
BACKGROUND = (0.92, 0.92, 0.92)
#: Shaded brightness factor runs from SHADE_LIGHT (top-left edge) to SHADE_DARK (bottom-right).
SHADE_LIGHT, SHADE_DARK = 1.0, 0.3
_SUPERSAMPLE = 4


def attribute_kind(value: str) -> str:
    """The attribute a value belongs to: "shaded" -> "style"."""
    for kind, values in ATTRIBUTES.items():
        if value in values:
            return kind
    raise ValueError(f"unknown attribute value {value!r}; known: {sorted(v for vs in ATTRIBUTES.values() for v in vs)}")


@dataclass(frozen=True)
class Spec:
    """Everything that decides one image: attributes plus placement (pixels, image of SIZE)."""

    shape: str
    colour: str
    style: str
    cx: float
    cy: float
    radius: float

    def value(self, kind: str) -> str:
        return getattr(self, kind)


def random_spec(rng: np.random.Generator, **fixed: str) -> Spec:
    """A uniformly random spec; keyword arguments (shape=, colour=, style=) pin attributes."""
    unknown = set(fixed) - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown attributes {sorted(unknown)}")
    values = {k: fixed.get(k) or vs[rng.integers(len(vs))] for k, vs in ATTRIBUTES.items()}
    for k, v in values.items():
        if v not in ATTRIBUTES[k]:
            raise ValueError(f"{k} must be one of {ATTRIBUTES[k]}, got {v!r}")
    cx, cy = rng.uniform(13.0, 19.0, size=2)
    return Spec(**values, cx=float(cx), cy=float(cy), radius=float(rng.uniform(8.0, 11.0)))


def render(spec: Spec) -> np.ndarray:
    """The image of `spec` as float32 [SIZE, SIZE, 3] in [0, 1] (anti-aliased by supersampling)."""
    n = SIZE * _SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float32) + 0.5) / _SUPERSAMPLE
    y, x = np.meshgrid(coords, coords, indexing="ij")
    dx, dy, r = x - spec.cx, y - spec.cy, spec.radius
    if spec.shape == "circle":
        inside = dx**2 + dy**2 <= r**2
    elif spec.shape == "square":
        inside = (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    else:  # triangle, apex up, base as wide as it is tall
        inside = (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    if spec.style == "shaded":
        s = np.clip((dx + dy) / (2 * r), -1.0, 1.0)  # -1 top-left .. 1 bottom-right
        factor = SHADE_LIGHT + (SHADE_DARK - SHADE_LIGHT) * (s + 1) / 2
    else:
        factor = np.ones_like(x)
    colour = np.asarray(RGB[spec.colour], dtype=np.float32)
    img = np.where(inside[..., None], factor[..., None] * colour, np.asarray(BACKGROUND, dtype=np.float32))
    return img.reshape(SIZE, _SUPERSAMPLE, SIZE, _SUPERSAMPLE, 3).mean(axis=(1, 3)).astype(np.float32)


def caption(shape: str | None = None, colour: str | None = None, style: str | None = None) -> str:
    """Caption naming the given attributes, e.g. caption("circle", "red") == "a red circle".

    An open shape reads "shape" ("a shaded red shape"); all open gives "a shape".
    """
    return " ".join(["a", *(w for w in (style, colour) if w), shape or "shape"])


def caption_words() -> list[str]:
    """Every word a caption can contain (the tokenizer's whole-word vocabulary)."""
    return ["a", "shape", *SHAPES, *COLOURS, *STYLES]


def to_pil(img: np.ndarray) -> Image.Image:
    """float [H, W, 3] in [0, 1] -> RGB PIL image."""
    return Image.fromarray(np.round(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8), "RGB")


def training_caption(spec: Spec, rng: np.random.Generator) -> str:
    """A caption for `spec` that drops attributes at random (the training distribution).

    Empty 10% of the time (for classifier-free guidance); otherwise the style is omitted half the
    time, the colour 30% and the shape 20%, independently.
    """
    if rng.random() < 0.1:
        return ""
    keep = rng.random(3) >= np.array([0.2, 0.3, 0.5])
    return caption(spec.shape if keep[0] else None, spec.colour if keep[1] else None, spec.style if keep[2] else None)


def make_dataset(n: int, seed: int) -> tuple[np.ndarray, list[Spec]]:
    """n random images (uint8 [n, SIZE, SIZE, 3]) and their specs."""
    rng = np.random.default_rng(seed)
    specs = [random_spec(rng) for _ in range(n)]
    return np.stack([np.asarray(to_pil(render(s))) for s in specs]), specs
