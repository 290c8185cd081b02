"""Table schemas and the conversion of one table row into a PreferenceExample.

Two table schemas are understood, by parquet files and Hugging Face datasets alike:

- pairs (Pick-a-Pic): ``caption``, ``jpg_0``, ``jpg_1``, ``label_0``, ``label_1``;
- unpaired feedback (KTO-style): ``caption``, ``jpg``, ``label``.

Other columns are ignored. Images are encoded bytes, an ``{"bytes", "path"}`` struct (the
``datasets.Image`` storage) or a path string (relative to the table's folder), which must resolve,
symlinks followed, inside the dataset's folder unless outside paths are allowed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .base import DataStats
from .errors import DataError
from .records import ImageSource, PreferenceExample

PAIR_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
UNPAIRED_COLUMNS = ("caption", "jpg", "label")
_LIKE = {"1", "true", "like", "liked", "good", "desirable", "yes"}
_DISLIKE = {"0", "false", "dislike", "disliked", "bad", "undesirable", "no"}


@dataclass(frozen=True)
class Schema:
    """Which of the two table schemas a file or dataset uses."""

    paired: bool

    @property
    def columns(self) -> tuple[str, ...]:
        return PAIR_COLUMNS if self.paired else UNPAIRED_COLUMNS

    @property
    def label_columns(self) -> tuple[str, ...]:
        return ("label_0", "label_1") if self.paired else ("label",)


def detect_schema(columns: Iterable[str], where: str) -> Schema:
    """The schema of a table with these columns; a missing column is an error naming it."""
    present = set(columns)
    schema = Schema(paired="jpg" not in present or "jpg_0" in present)
    for column in schema.columns:
        if column not in present:
            kind = "pair (Pick-a-Pic)" if schema.paired else "unpaired"
            raise DataError(f"{where}: missing column {column!r} (a {kind} table needs {', '.join(schema.columns)})")
    return schema


def pair_order(label_0: Any, label_1: Any, where: str) -> str:
    """'keep', 'swap' (jpg_1 won) or 'tie' for a pair's labels; anything else is an error."""
    try:
        l0, l1 = float(label_0), float(label_1)
    except (TypeError, ValueError):
        raise DataError(f"{where}: labels must be numbers, got label_0={label_0!r}, label_1={label_1!r}") from None
    if l0 not in (0.0, 0.5, 1.0) or l1 not in (0.0, 0.5, 1.0) or not math.isclose(l0 + l1, 1.0):
        raise DataError(
            f"{where}: label_0={l0:g}, label_1={l1:g}; expected label_0 in {{0, 0.5, 1}} and label_1 = 1 - label_0"
        )
    return "tie" if l0 == 0.5 else ("keep" if l0 == 1.0 else "swap")


def unpaired_label(value: Any, where: str) -> float:
    """1.0 (liked) or 0.0 (disliked) from 1/0, true/false or like/dislike."""
    if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
        return float(value)
    text = str(value).strip().lower()
    if text in _LIKE:
        return 1.0
    if text in _DISLIKE:
        return 0.0
    raise DataError(f"{where}: label={value!r}; expected 1/0, true/false or like/dislike")


def image_path(value: str, folder: Path | None, roots: tuple[Path, ...] | None, where: str, field: str) -> Path:
    """A path from a table cell or a jsonl field, relative to `folder`. With `roots`, it must resolve
    (symlinks followed) inside one of them; the refusal reads the same whether the file exists or not."""
    path = Path(value) if folder is None else folder / value
    if roots is not None:
        try:
            resolved = path.resolve()
            inside = any(resolved.is_relative_to(root.resolve()) for root in roots)
        except (OSError, RuntimeError):  # a symlink loop
            inside = False
        if not inside:
            raise DataError(f"{where}: {field} {value!r} is outside the dataset folder {', '.join(map(str, roots))}; "
                            "set allow_outside_paths = true (--allow-outside-paths) to read images from anywhere")
    return path


def image_source(value: Any, folder: Path | None, roots: tuple[Path, ...] | None, where: str, column: str) -> ImageSource:
    """Encoded bytes or a path (see `image_path`) from a cell of an image column."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value):
        return bytes(value)
    if isinstance(value, str) and value:
        return image_path(value, folder, roots, where, f"column {column!r}")
    raise DataError(f"{where}: column {column!r} holds no image (got {type(value).__name__})")


def row_to_example(
    row: dict[str, Any], schema: Schema, where: str, keep_ties: bool, folder: Path | None = None,
    roots: tuple[Path, ...] | None = None,
) -> PreferenceExample | None:
    """The example for one row, winner first; None for a tie that is dropped. Image paths are
    relative to `folder` and confined to `roots` (None: anywhere)."""
    caption = row["caption"]
    prompt = "" if caption is None else str(caption)
    if not schema.paired:
        image = image_source(row["jpg"], folder, roots, where, "jpg")
        return PreferenceExample(prompt, (image,), (unpaired_label(row["label"], where),), where)
    order = pair_order(row["label_0"], row["label_1"], where)
    if order == "tie" and not keep_ties:
        return None
    first = image_source(row["jpg_0"], folder, roots, where, "jpg_0")
    second = image_source(row["jpg_1"], folder, roots, where, "jpg_1")
    images = (second, first) if order == "swap" else (first, second)
    return PreferenceExample(prompt, images, (1.0, 0.0), where)


def kept_rows(
    schema: Schema, labels: Sequence[Sequence[Any]], where: Callable[[int], str], keep_ties: bool, stats: DataStats
) -> np.ndarray:
    """Validate a block of label columns and return the offsets of the rows kept (ties dropped)."""
    keep = []
    for r, values in enumerate(zip(*labels)):
        stats.rows_read += 1
        if not schema.paired:
            unpaired_label(values[0], where(r))
        elif pair_order(*values, where(r)) == "tie" and not keep_ties:
            stats.ties_dropped += 1
            continue
        keep.append(r)
    return np.asarray(keep, dtype=np.int64)
