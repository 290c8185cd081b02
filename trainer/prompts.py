"""Prompt files: plain text (one prompt a line) or JSON Lines (``{"prompt": "..."}`` a line).

Blank lines are skipped in both. A bad line stops with its file and line number.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

MAX_PROMPT_FILE = 64 * 2**20  # bytes: a prompt list, not a dataset


def read_prompts(path: str | os.PathLike, option: str = "--prompts") -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{option} {path}: no such file")
    if path.stat().st_size > MAX_PROMPT_FILE:
        raise ValueError(f"{option} {path}: larger than {MAX_PROMPT_FILE >> 20} MiB; is this a prompt list?")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{option} {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        prompts.append(_jsonl_prompt(line, f"{path} line {number}") if jsonl else line.strip())
    if not prompts:
        raise ValueError(f"{option} {path}: no prompts in the file")
    return prompts


def _jsonl_prompt(line: str, where: str) -> str:
    try:
        row = json.loads(line)
    except ValueError as e:
        raise ValueError(f"{where}: not JSON ({e})") from None
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
        raise ValueError(f'{where}: expected an object with a non-empty string "prompt"')
    return row["prompt"].strip()
