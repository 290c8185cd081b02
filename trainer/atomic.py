"""Atomic file writes: temp file in the same folder, fsync, rename. A crash leaves the old file.

Every file the trainer and the nodes write (LoRA, checkpoints, config, summary, encoding-cache shards,
the pair store's images and exports) goes through `atomic_path`: a reader, or a run resumed after
`kill -9` or a power cut, sees either the previous complete file or the new complete file, never a
torn one. A full disk (ENOSPC/EDQUOT) leaves the previous file in place and says so.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

# the mode a plain open() would give a new file (mkstemp's temp files are 0600)
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK

_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DISK_FULL_TEXT = ("no space left on device", "storagefull", "disk quota exceeded")


class DiskFullError(OSError):
    """Writing failed because the disk (or quota) is full; the previous file at the path is intact."""


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC/EDQUOT from Python, or the same error reported by a native writer (safetensors, pyarrow)."""
    if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
        return True
    text = str(e).lower()
    return any(t in text for t in _DISK_FULL_TEXT)


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's entry list, after a rename into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path`, on error it is removed.

    The temp file is fsynced before the rename and the folder after it, so the new content is durable
    once this returns. On a full disk a `DiskFullError` names the path and says the old file is intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, FILE_MODE)  # after the writer: mkstemp's 0600, which safetensors also re-creates
        fsync_path(tmp_path)
        os.replace(tmp_path, path)
        fsync_path(path.parent)
    except BaseException as e:
        tmp_path.unlink(missing_ok=True)
        if isinstance(e, Exception) and not isinstance(e, DiskFullError) and is_disk_full(e):
            previous = "the previous file is intact" if path.exists() else "no previous file was there"
            raise DiskFullError(errno.ENOSPC, f"disk full while writing {path}; {previous}. Free some space "
                                              f"and run again (training continues with --resume latest)") from e
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        _write_file(tmp, data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save contiguous CPU copies of `tensors` atomically."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


class atomic_dir:
    """Build a folder under a temp name and rename it into place; an existing complete folder wins."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def __enter__(self) -> Path:
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.folder.parent, prefix=f".{self.folder.name}."))
        os.chmod(self.tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; the folder is for other users too
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                os.replace(self.tmp, self.folder)
                return
            except OSError:
                if not self.folder.is_dir() or not any(self.folder.iterdir()):
                    raise
        shutil.rmtree(self.tmp, ignore_errors=True)
