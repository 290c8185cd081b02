"""Deterministic pixel-statistics classifier for toy-world images, prompt fidelity, and a Wilson interval.

The object is the set of pixels far from the background (the median border colour). Shape comes
from how much of its bounding box it fills (square 1, circle pi/4, triangle 1/2), colour from the
nearest reference chromaticity of its mean colour, style from the brightness slope along the
top-left to bottom-right diagonal (zero when flat, strongly negative when shaded).
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from .world import ATTRIBUTES, COLOURS, RGB, attribute_kind

_MASK_THRESHOLD = 0.25  # max channel distance from the background that counts as object
_MIN_PIXELS = 12
_FILL_SQUARE, _FILL_TRIANGLE = 0.9, 0.64  # fill above -> square; below -> triangle
_SHADED_SLOPE = -0.2  # brightness slope per half-diagonal, relative to the mean: at or below -> shaded
_CHROMA = np.array([np.asarray(RGB[c]) / sum(RGB[c]) for c in COLOURS])

ImageLike = Image.Image | np.ndarray | torch.Tensor


def _as_array(image: ImageLike) -> np.ndarray:
    """float [H, W, 3] in [0, 1] from PIL, uint8/float HWC arrays, or a float CHW tensor in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if isinstance(image, torch.Tensor):
        return image.detach().float().cpu().permute(1, 2, 0).numpy()
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    return image.astype(np.float32)


def _erode(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 4 neighbours are all in `mask`."""
    core = mask.copy()
    core[1:] &= mask[:-1]
    core[:-1] &= mask[1:]
    core[:, 1:] &= mask[:, :-1]
    core[:, :-1] &= mask[:, 1:]
    return core


def classify(image: ImageLike) -> dict[str, str | None]:
    """{"shape", "colour", "style"} of the object in `image`; all None when no object is found."""
    img = _as_array(image)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    background = np.median(border, axis=0)
    mask = np.abs(img - background).max(axis=-1) > _MASK_THRESHOLD
    if mask.sum() < _MIN_PIXELS:
        return {"shape": None, "colour": None, "style": None}
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = mask.sum() / box
    shape = "square" if fill > _FILL_SQUARE else "triangle" if fill < _FILL_TRIANGLE else "circle"

    core = _erode(mask)  # edge pixels blend with the background: colour and style use the core
    if core.sum() < _MIN_PIXELS:
        core = mask
    ys, xs = np.nonzero(core)
    pixels = img[core]
    mean = pixels.mean(axis=0)
    chroma = mean / max(float(mean.sum()), 1e-6)
    colour = COLOURS[int(np.argmin(((_CHROMA - chroma) ** 2).sum(axis=1)))]

    brightness = pixels.mean(axis=1)
    half_diagonal = (ys.max() - ys.min() + xs.max() - xs.min() + 2) / 2
    u = ((xs - xs.mean()) + (ys - ys.mean())) / half_diagonal
    slope = float((u * (brightness - brightness.mean())).sum() / max(float((u**2).sum()), 1e-6))
    style = "shaded" if slope / max(float(brightness.mean()), 1e-6) <= _SHADED_SLOPE else "flat"
    return {"shape": shape, "colour": colour, "style": style}


def has_attribute(image: ImageLike, attribute: str) -> bool:
    """Whether the classifier finds `attribute` (e.g. "shaded", "red", "circle") in `image`."""
    return classify(image)[attribute_kind(attribute)] == attribute


def attribute_rate(images: Iterable[ImageLike] | torch.Tensor, attribute: str) -> float:
    """Fraction of `images` that have `attribute` (a [N, 3, H, W] tensor counts as N images)."""
    attribute_kind(attribute)  # validate even for an empty batch
    flags = [has_attribute(im, attribute) for im in images]
    if not flags:
        raise ValueError("attribute_rate needs at least one image")
    return sum(flags) / len(flags)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (default 95%)."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got {successes}/{n}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def rate_interval(images: Sequence[ImageLike], attribute: str, z: float = 1.96) -> tuple[float, float, float]:
    """(rate, low, high): the attribute rate of `images` with its Wilson interval."""
    hits = sum(has_attribute(im, attribute) for im in images)
    low, high = wilson_interval(hits, len(images), z)
    return hits / len(images), low, high


def prompted_attributes(prompt: str) -> dict[str, str]:
    """The attributes a toy caption names, by kind: "a red circle" -> {"colour": "red", "shape": "circle"}."""
    return {kind: word for word in prompt.split() for kind, values in ATTRIBUTES.items() if word in values}


def fidelity_counts(images: Sequence[ImageLike], prompts: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Prompt fidelity: per attribute kind, (images whose classified value is the one their prompt names,
    images whose prompt names that kind). Kinds no prompt names are absent."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    counts: dict[str, list[int]] = {}
    for image, prompt in zip(images, prompts):
        named = prompted_attributes(prompt)
        found = classify(image) if named else {}
        for kind, value in named.items():
            hits_n = counts.setdefault(kind, [0, 0])
            hits_n[0] += found[kind] == value
            hits_n[1] += 1
    return {kind: (hits, n) for kind, (hits, n) in counts.items()}


#: How far (absolute) the rate of a prompted attribute may fall before the fidelity verdict fails.
FIDELITY_BOUND = 0.05


def fidelity_rates(images: Sequence[ImageLike], prompts: Sequence[str], z: float = 1.96
                   ) -> dict[str, tuple[float, float, float]]:
    """Per prompted attribute kind: (rate, low, high), the share of images that keep it with its Wilson interval."""
    return {kind: (hits / n, *wilson_interval(hits, n, z)) for kind, (hits, n) in fidelity_counts(images, prompts).items()}


def fidelity_drops(before: dict[str, tuple[float, ...]], after: dict[str, tuple[float, ...]],
                   bound: float = FIDELITY_BOUND) -> dict[str, float]:
    """The kinds whose rate fell by more than `bound` from `before` to `after` (rates as `fidelity_rates` gives
    them), with the fall."""
    return {kind: before[kind][0] - after[kind][0] for kind in before if before[kind][0] - after[kind][0] > bound}
