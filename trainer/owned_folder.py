"""A folder that belongs to one run, its state in one format-tagged JSON file (`trainer pairs`, `trainer iterate`).

A run may start in a new or empty folder, or continue in a folder holding a run with the same settings (when
told to resume, or when that run is finished); anything else is refused with one line that says why.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from .atomic import write_text


def differing(a: dict, b: dict) -> list[str]:
    """Keys whose values differ between two settings dicts, sorted."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


class OwnedFolder:
    def __init__(self, root: Path, state_file: str, fmt: str, kind: str, ignore: tuple[str, ...] = ()) -> None:
        """`kind` names the run in messages, with its article ("a pairs run"); files named in `ignore` do not make a folder non-empty."""
        self.root, self.path, self.format, self.kind, self.ignore = Path(root), Path(root) / state_file, fmt, kind, ignore

    def read(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            state = json.loads(self.path.read_text())
        except ValueError:
            raise ValueError(f"{self.path}: damaged (not JSON); use another --output-dir") from None
        if not isinstance(state, dict) or state.get("format") != self.format:
            raise ValueError(f"{self.path}: not the state of {self.kind}; use another --output-dir")
        return state

    def claim(self, settings: dict, resume: bool, progress: Callable[[dict], str | None], resume_flag: str
              ) -> dict | None:
        """The state to continue from, or None for a fresh run.

        `progress(state)` says how far the run got, or None when it is finished (then no resume flag is needed).
        """
        state = self.read()
        if state is None:
            if self.root.exists() and any(p.name not in self.ignore for p in self.root.iterdir()):
                raise ValueError(f"--output-dir {self.root}: not empty and not the folder of {self.kind}; use an "
                                 "empty or new folder")
            return None
        keys = differing(state["settings"], settings)
        if keys:
            raise ValueError(f"--output-dir {self.root} holds {self.kind} with other settings ({', '.join(keys)}); "
                             "use another folder")
        done = progress(state)
        if not resume and done is not None:
            raise ValueError(f"--output-dir {self.root} holds {self.kind}, unfinished ({done}): add {resume_flag} "
                             "to continue it")
        return state

    def save(self, state: dict) -> None:
        write_text(self.path, json.dumps(state, indent=1))
