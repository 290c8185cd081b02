"""A folder of images described by a JSON-lines file.

Pairs: rows ``{"prompt", "chosen", "rejected"}``. Unpaired feedback: rows
``{"prompt", "image", "label"}`` with label 1/0, true/false or "like"/"dislike".
Image paths are relative to the folder holding the jsonl file and must resolve (symlinks
followed) inside it unless `allow_outside_paths`; one kind of row per file.
"""
from __future__ import annotations

import json
from pathlib import Path

from .base import DataStats, MapSource
from .errors import DataError
from .records import PreferenceExample
from .rows import image_path, unpaired_label

JSONL_NAMES = ("pairs.jsonl", "feedback.jsonl")
_PAIR_KEYS = ("prompt", "chosen", "rejected")
_UNPAIRED_KEYS = ("prompt", "image", "label")


def find_jsonl(path: Path) -> Path | None:
    """`path` if it is a .jsonl file, else pairs.jsonl or feedback.jsonl inside the folder."""
    if path.is_file() and path.suffix == ".jsonl":
        return path
    return next((path / n for n in JSONL_NAMES if (path / n).is_file()), None) if path.is_dir() else None


class JsonlFolderSource(MapSource):
    """Examples from a jsonl file whose rows name image files beside it."""

    def __init__(self, jsonl: Path, limit: int | None = None, allow_outside_paths: bool = False):
        self.name = str(jsonl)
        self.roots = None if allow_outside_paths else (jsonl.parent,)
        self.stats = DataStats()
        self.examples: list[PreferenceExample] = []
        kinds: set[bool] = set()
        with open(jsonl, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                if limit is not None and len(self.examples) >= limit:
                    break
                where = f"{jsonl} line {number}"
                example = self._parse(line, jsonl.parent, where, self.roots)
                kinds.add(example.is_pair)
                if len(kinds) > 1:
                    raise DataError(f"{where}: mixes pair and unpaired rows; use one kind per file")
                self.examples.append(example)
                self.stats.rows_read += 1
        self.paired = kinds != {False}
        self._check_not_empty()

    @staticmethod
    def _parse(line: str, folder: Path, where: str, roots: tuple[Path, ...] | None) -> PreferenceExample:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON: {e}") from None
        except RecursionError:
            raise DataError(f"{where}: not valid JSON: nested too deeply") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object")
        keys = _UNPAIRED_KEYS if "image" in row else _PAIR_KEYS
        for key in keys:
            if key not in row:
                raise DataError(f"{where}: missing field {key!r} (rows need {', '.join(keys)})")
        prompt = str(row["prompt"])
        images = []
        for key in ("image",) if "image" in row else ("chosen", "rejected"):
            if not isinstance(row[key], str) or not row[key]:
                raise DataError(f"{where}: field {key!r} must be an image path (a string), got {type(row[key]).__name__}")
            images.append(image_path(row[key], folder, roots, where, f"field {key!r}"))
        labels = (unpaired_label(row["label"], where),) if "image" in row else (1.0, 0.0)
        return PreferenceExample(prompt, tuple(images), labels, where)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> PreferenceExample:
        return self.examples[index]

    def prompts(self) -> list[str]:
        return [e.prompt for e in self.examples]
