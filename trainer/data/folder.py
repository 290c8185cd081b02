"""A folder of images described by a JSON-lines file.

Pairs: rows ``{"prompt", "chosen", "rejected"}``. Unpaired feedback: rows
``{"prompt", "image", "label"}`` with label 1/0, true/false or "like"/"dislike".
Image paths are relative to the folder holding the jsonl file; one kind of row per file.
"""
from __future__ import annotations

import json
from pathlib import Path

from .base import DataStats, MapSource
from .errors import DataError
from .records import PreferenceExample
from .rows import unpaired_label

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

    def __init__(self, jsonl: Path, limit: int | None = None):
        self.name = str(jsonl)
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
                example = self._parse(line, jsonl.parent, where)
                kinds.add(example.is_pair)
                if len(kinds) > 1:
                    raise DataError(f"{where}: mixes pair and unpaired rows; use one kind per file")
                self.examples.append(example)
                self.stats.rows_read += 1
        self.paired = kinds != {False}
        self._check_not_empty()

    @staticmethod
    def _parse(line: str, folder: Path, where: str) -> PreferenceExample:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON: {e}") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object")
        keys = _UNPAIRED_KEYS if "image" in row else _PAIR_KEYS
        for key in keys:
            if key not in row:
                raise DataError(f"{where}: missing field {key!r} (rows need {', '.join(keys)})")
        prompt = str(row["prompt"])
        if "image" in row:
            return PreferenceExample(prompt, (folder / row["image"],), (unpaired_label(row["label"], where),), where)
        return PreferenceExample(prompt, (folder / row["chosen"], folder / row["rejected"]), (1.0, 0.0), where)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> PreferenceExample:
        return self.examples[index]

    def prompts(self) -> list[str]:
        return [e.prompt for e in self.examples]
