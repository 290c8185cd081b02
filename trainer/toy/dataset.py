"""Toy preference datasets: pairs that differ only in one attribute the caption leaves open."""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
from pathlib import Path

import numpy as np

from .world import ATTRIBUTES, attribute_kind, caption, random_spec, render, to_pil


def open_prompts(attribute: str) -> list[str]:
    """Every caption that names the other two attributes and leaves `attribute`'s kind open.

    open_prompts("shaded") == ["a red circle", "a green circle", ...] (12 prompts).
    """
    kind = attribute_kind(attribute)
    others = [k for k in ATTRIBUTES if k != kind]
    return [caption(**dict(zip(others, values))) for values in itertools.product(*(ATTRIBUTES[k] for k in others))]


def write_preference_dataset(folder: str | os.PathLike, attribute: str, n_pairs: int, seed: int) -> Path:
    """Write `n_pairs` pairs preferring `attribute` to `folder`; return the folder.

    Each pair renders one random object twice, identical except that the chosen image has
    `attribute` and the rejected one another value of the same kind (e.g. "shaded" vs "flat"); the
    prompt names the other attributes only. Layout: images/NNNNN_{chosen,rejected}.png and
    pairs.jsonl rows {"prompt", "chosen", "rejected"} with paths relative to the folder.
    pairs.jsonl is written last, so an interrupted run leaves no dataset file.
    """
    kind = attribute_kind(attribute)
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be positive, got {n_pairs}")
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    alternatives = [v for v in ATTRIBUTES[kind] if v != attribute]
    rows = []
    for i in range(n_pairs):
        chosen = random_spec(rng, **{kind: attribute})
        rejected = dataclasses.replace(chosen, **{kind: alternatives[rng.integers(len(alternatives))]})
        row = {"prompt": caption(**{k: chosen.value(k) for k in ATTRIBUTES if k != kind})}
        for name, spec in (("chosen", chosen), ("rejected", rejected)):
            rel = f"images/{i:05d}_{name}.png"
            to_pil(render(spec)).save(folder / rel)
            row[name] = rel
        rows.append(row)
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder
