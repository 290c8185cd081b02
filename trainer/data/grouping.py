"""Order rows so that consecutive rows hold related prompts (for Diffusion-RPO batches).

Grouping (fixed for the run): each prompt's words are lower-cased alphanumeric tokens of three
or more characters, minus common stop words. A row's key is its rarest word (fewest rows)
that at least `min_size` rows share; rows with the same key form a group. Rows with no such
word are "loose". Rarest-shared picks the most specific topic ("corgi" rather than "photo").

Ordering (per epoch, seeded): each group is shuffled and cut into chunks of `size` rows;
leftovers of every group (in shuffled group order), then the loose rows, are chunked the same
way; all chunks are shuffled. A chunk is one batch, so a batch holds related prompts while the
topics still change from batch to batch. Fewer than `size` rows may remain at the end.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Sequence

import numpy as np

_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    "the and with for from that this into over under while very has have are was were its his her "
    "their our your you they them not but all any one two some more most like".split()
)


def prompt_words(prompt: str) -> set[str]:
    return {w for w in _WORD.findall(prompt.lower()) if len(w) >= 3 and w not in _STOP}


def related_groups(prompts: Sequence[str], min_size: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Row indices per group (sorted by key) and the loose rows."""
    words = [prompt_words(p) for p in prompts]
    frequency = Counter(w for ws in words for w in ws)
    groups: dict[str, list[int]] = defaultdict(list)
    loose = []
    for row, ws in enumerate(words):
        shared = [(frequency[w], w) for w in ws if frequency[w] >= min_size]
        if shared:
            groups[min(shared)[1]].append(row)
        else:
            loose.append(row)
    return [np.asarray(groups[k]) for k in sorted(groups)], np.asarray(loose, dtype=np.int64)


def related_order(groups: list[np.ndarray], loose: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """One epoch's row order: chunks of `size` related rows in random order, then the remainder."""
    chunks: list[np.ndarray] = []
    leftovers = []
    for g in rng.permutation(len(groups)):
        rows = rng.permutation(groups[g])
        full = len(rows) // size * size
        chunks.extend(rows[:full].reshape(-1, size))
        leftovers.append(rows[full:])
    pool = np.concatenate(leftovers + [rng.permutation(loose)]).astype(np.int64)
    full = len(pool) // size * size
    chunks.extend(pool[:full].reshape(-1, size))
    ordered = [chunks[i] for i in rng.permutation(len(chunks))]
    return np.concatenate(ordered + [pool[full:]]).astype(np.int64)
