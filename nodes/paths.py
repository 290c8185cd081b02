"""Paths a graph names, and paths shown to the user.

A path typed into a node (a dataset, a parquet file to import) must resolve, after following symlinks,
inside a folder PrefAlign reads data from:

- ComfyUI's input folder;
- each folder listed in $PREFALIGN_DATASETS_DIR (several separated by the OS path separator, ':' on Linux);
- each folder registered as `prefalign_datasets` in ComfyUI's extra_model_paths.yaml.

Anything else (an absolute path elsewhere, `..`, a symlink out) is refused with one message that is the
same whether or not the path exists. Messages name files relative to ComfyUI's folders
("input/pairs.parquet"), never by their absolute server path.
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from . import comfy_env

DATASETS_ENV = "PREFALIGN_DATASETS_DIR"
DATASETS_KEY = "prefalign_datasets"


@dataclass(frozen=True)
class Folder:
    """A folder shown to the user by its label ("input", "output", ...)."""

    label: str
    path: Path


def data_roots() -> list[Folder]:
    """The folders a graph may read data from, resolved."""
    fp = comfy_env.folder_paths()
    found = [Folder("input", Path(fp.get_input_directory()))]
    found += [Folder("datasets", Path(f)) for f in os.environ.get(DATASETS_ENV, "").split(os.pathsep) if f.strip()]
    registered = getattr(fp, "folder_names_and_paths", {}).get(DATASETS_KEY)
    if registered:
        found += [Folder("datasets", Path(f)) for f in registered[0]]
    return [Folder(f.label, f.path.resolve()) for f in found]


def searched(roots: list[Folder] | None = None) -> str:
    """The data roots as the user knows them, for 'not found' messages."""
    roots = data_roots() if roots is None else roots
    extra = len(roots) - 1
    return "ComfyUI's input folder" + (f" and {extra} datasets folder{'s' if extra > 1 else ''} (${DATASETS_ENV})" if extra else "")


def _inside(path: Path, roots: list[Folder]) -> bool:
    return any(path == r.path or path.is_relative_to(r.path) for r in roots)


def find_data_path(text: str) -> Path | None:
    """The file or folder `text` names inside a data root (resolved), or None if no root holds it.

    A relative path is looked up in each root in turn. A path that leaves the roots raises ValueError,
    with the same message whether or not it exists."""
    roots = data_roots()
    given = Path(text)
    for candidate in [given] if given.is_absolute() else [r.path / given for r in roots]:
        try:
            resolved = candidate.resolve()
        except (OSError, RuntimeError):  # a symlink loop
            resolved = None
        if resolved is None or not _inside(resolved, roots):
            raise ValueError(f"{text!r} is outside the folders PrefAlign reads data from ({searched(roots)}); "
                             f"put the data in ComfyUI's input folder or add its folder to ${DATASETS_ENV}")
        if resolved.exists():
            return resolved
    return None


def require_data_path(text: str, what: str) -> Path:
    """`find_data_path`, with an error naming the folders searched when nothing is there."""
    text = text.strip()
    if not text:
        raise ValueError(f"{what} is empty")
    found = find_data_path(text)
    if found is None:
        raise ValueError(f"{what} {text!r} not found in {searched()}")
    return found


def shown_folders() -> list[Folder]:
    """ComfyUI's folders by label, most specific first (a path is shown relative to the deepest one)."""
    fp = comfy_env.folder_paths()
    named = [Folder("stores", comfy_env.stores_base())]
    for label, getter in (("input", "get_input_directory"), ("output", "get_output_directory"),
                          ("temp", "get_temp_directory"), ("user", "get_user_directory")):
        if hasattr(fp, getter):
            named.append(Folder(label, Path(getattr(fp, getter)())))
    named += [f for f in data_roots() if f.label != "input"]
    if getattr(fp, "base_path", None):
        named.append(Folder("ComfyUI", Path(fp.base_path)))
    both = [Folder(f.label, p) for f in named for p in {f.path, f.path.resolve()}]
    return sorted(both, key=lambda f: len(str(f.path)), reverse=True)


def display_path(path: str | Path) -> str:
    """`input/x.parquet` for a file in ComfyUI's input folder; only the name for a path outside them all."""
    path = Path(path)
    for folder in shown_folders():
        if path == folder.path or path.is_relative_to(folder.path):
            return "/".join((folder.label, *path.relative_to(folder.path).parts))
    return path.name


def redact(message: str) -> str:
    """A message with every absolute path under ComfyUI's folders rewritten relative to them."""
    for folder in shown_folders():
        message = re.sub(re.escape(str(folder.path)) + r"(?=[/\\\s'\",:;)\]]|$)", folder.label, message)
    return message


@contextmanager
def shown_errors() -> Iterator[None]:
    """User mistakes (ValueError, which the store and data errors are) leave as one ValueError whose
    message shows no server path; ComfyUI shows it on the node."""
    try:
        yield
    except ValueError as e:
        raise ValueError(redact(str(e))) from None
