"""Resumable checkpoints without pickles: tensors in safetensors, everything else in JSON.

A checkpoint is the folder `checkpoints/step-N/`, built under a temp name and renamed into place
after every file is fsynced, so a folder named step-N is always complete; `latest` is the highest.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .atomic import _fsync_dir, save_safetensors, write_text

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
    """Write `root/step-N` atomically and prune all but the newest `keep` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step}"
    tmp = root / f".step-{state.step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
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
    write_text(tmp / "state.json", json.dumps(body))
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp folders of an interrupted save are ignored)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / "state.json").exists()]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, root: Path) -> Path | None:
    """`latest` -> newest checkpoint under root (None if there is none); else the named folder."""
    if resume == "latest":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").exists():
        raise ValueError(f"config key 'resume': {path} is not a checkpoint folder (no state.json)")
    return path


def load_checkpoint(folder: Path) -> TrainingState:
    body = json.loads((folder / "state.json").read_text())
    tensors = load_file(str(folder / "state.safetensors"))
    return TrainingState(
        step=body["step"],
        adapter=load_file(str(folder / "adapter.safetensors")),
        optimizer=_join_tensors(body["optimizer"], tensors),
        lr_scheduler=_join_tensors(body["lr_scheduler"], tensors),
        generator=tensors["generator"],
        data=body["data"],
        extra=body["extra"],
    )
