"""Resumable checkpoints without pickles: tensors in safetensors, everything else in JSON.

A checkpoint is the folder `checkpoints/step-N/`, built under a temp name and renamed into place
after every file is fsynced, so a folder named step-N is always complete; `latest` is the highest
one whose files match the sizes its state.json recorded.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .atomic import DiskFullError, fsync_path, is_disk_full, save_safetensors, write_text

STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainingState:
    """Everything besides the model needed to continue a run exactly."""

    step: int
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any]
    generator: torch.Tensor  # the noise/timestep generator's state
    data: dict[str, Any]  # the sampler's position
    extra: dict[str, Any] = field(default_factory=dict)


def _split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors in a nested structure by {"__tensor__": key}, collecting them."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_key(k), _split_tensors(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__} at {prefix}")


def _key(k: Any) -> Any:
    if not isinstance(k, (int, str)):
        raise TypeError(f"cannot checkpoint a dict key of type {type(k).__name__}")
    return k


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {k: _join_tensors(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


def save_checkpoint(root: Path, state: TrainingState, keep: int) -> Path:
    """Write `root/step-N` atomically and prune all but the newest `keep` checkpoints.

    The folder is built as `.step-N.tmp`, every file fsynced, `state.json` (with the other files'
    sizes) written last, then renamed into place: a folder named step-N is complete, whatever moment
    the process is killed at. Old folders are renamed away before they are deleted, so a kill during
    pruning never leaves a half-deleted folder that looks like a checkpoint. On a full disk the
    previous checkpoints are left as they were and the error says which one is the latest.
    """
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    final = root / f"step-{state.step}"
    tmp = root / f".step-{state.step}.tmp"
    try:
        tmp.mkdir()
        tensors: dict[str, torch.Tensor] = {"generator": state.generator}
        body = {
            "step": state.step,
            "optimizer": _split_tensors(state.optimizer, "optimizer", tensors),
            "lr_scheduler": _split_tensors(state.lr_scheduler, "lr_scheduler", tensors),
            "data": state.data,
            "extra": state.extra,
        }
        save_safetensors(tmp / "adapter.safetensors", state.adapter)
        save_safetensors(tmp / "state.safetensors", tensors)
        body["files"] = {name: (tmp / name).stat().st_size for name in TENSOR_FILES}
        write_text(tmp / "state.json", json.dumps(body))
        fsync_path(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and is_disk_full(e):
            found = list_checkpoints(root)
            previous = f"the latest checkpoint {found[-1]} is intact" if found else "there is no earlier checkpoint"
            raise DiskFullError(errno.ENOSPC, f"disk full while saving checkpoint {final}; {previous}. Free some "
                                              "space and continue with --resume latest") from e
        raise
    old = root / f".step-{state.step}.old"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(root)
    shutil.rmtree(old, ignore_errors=True)
    for stale in list_checkpoints(root)[:-keep] if keep > 0 else []:
        _remove(stale)
    return final


TENSOR_FILES = ("adapter.safetensors", "state.safetensors")


def _remove(folder: Path) -> None:
    """Rename away first (atomic: the name step-N disappears at once), then delete."""
    doomed = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _remove_leftovers(root: Path) -> None:
    """Temp and half-deleted folders of a save or prune that a crash interrupted."""
    for p in root.iterdir():
        if p.name.startswith(".step-") and p.name.endswith((".tmp", ".old")):
            shutil.rmtree(p, ignore_errors=True)


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is not a complete checkpoint (None if it is)."""
    try:
        body = json.loads((folder / "state.json").read_text())
    except FileNotFoundError:
        return "no state.json"
    except (OSError, ValueError) as e:
        return f"state.json is unreadable ({e})"
    if not isinstance(body, dict) or "step" not in body:
        return "state.json is not a checkpoint's"
    sizes = body.get("files") or {name: None for name in TENSOR_FILES}
    for name, size in sizes.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if size is not None and path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, state.json recorded {size}"
    return None


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp folders of an interrupted save, incomplete ones ignored)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_DIR.match(p.name)) and p.is_dir() and checkpoint_problem(p) is None]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, root: Path) -> Path | None:
    """`latest` -> newest complete checkpoint under root (None if there is none); else the named folder."""
    if resume == "latest":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    problem = checkpoint_problem(path) if path.is_dir() else "no such folder"
    if problem is not None:
        raise ValueError(f"config key 'resume': {path} is not a complete checkpoint folder ({problem})")
    return path


def load_checkpoint(folder: Path) -> TrainingState:
    """Read a checkpoint (JSON and safetensors only: nothing is unpickled)."""
    try:
        body = json.loads((folder / "state.json").read_text())
        tensors = load_file(str(folder / "state.safetensors"))
        return TrainingState(
            step=int(body["step"]),
            adapter=load_file(str(folder / "adapter.safetensors")),
            optimizer=_join_tensors(body["optimizer"], tensors),
            lr_scheduler=_join_tensors(body["lr_scheduler"], tensors),
            generator=tensors["generator"],
            data=body["data"],
            extra=body["extra"],
        )
    except Exception as e:  # safetensors reports a damaged file with its own exception type
        raise ValueError(f"checkpoint {folder} is damaged and cannot be resumed from ({type(e).__name__}: {e}); "
                         "name an older step-N folder with --resume") from e
