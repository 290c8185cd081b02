"""Resumable checkpoints without pickles: tensors in safetensors, everything else in JSON.

A checkpoint is the folder `checkpoints/step-N/`, built under a temp name and renamed into place
after every file is fsynced, so a folder named step-N is always complete; `latest` is the highest
one whose files match the sizes its state.json recorded and whose tensors are all finite.

A checkpoint folder is also input a stranger may have written: state.json is checked for size,
nesting depth (before `json.loads` recurses into it), types and ranges, and a folder that fails is
skipped with a warning line saying why; tensors must be finite to be loaded.
"""
from __future__ import annotations

import errno
import itertools
import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .atomic import DiskFullError, fsync_path, is_disk_full, save_safetensors, write_text

STEP_DIR = re.compile(r"^step-(\d+)$")
#: state.json holds the optimiser's layout (tensors are in state.safetensors): kilobytes, nesting ~6 deep.
MAX_STATE_BYTES = 64 * 2**20
MAX_STATE_DEPTH = 32
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')  # unrolled: linear time on long strings
_warned: set[tuple[Path, str]] = set()


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
    if state.step < 0:
        raise ValueError(f"cannot checkpoint a negative step ({state.step})")
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


def _nesting_depth(text: str) -> int:
    """The deepest [ / { nesting of a JSON text (brackets inside strings do not count)."""
    brackets = re.findall(r"[][{}]", _JSON_STRING.sub('""', text))
    return max(itertools.accumulate(1 if b in "[{" else -1 for b in brackets), default=0)


def _value_problem(obj: Any, where: str, encoded: bool) -> str | None:
    """Why `obj` is not a JSON value a checkpoint holds: finite numbers, strings, lists, and dicts
    (encoded by `_split_tensors` when `encoded`: {"__tensor__": key} or {"__dict__": [[key, value], ...]})."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return None
    if isinstance(obj, float):
        return None if math.isfinite(obj) else f"{where} is {obj}"
    if isinstance(obj, list):
        return next((p for i, v in enumerate(obj) if (p := _value_problem(v, f"{where}.{i}", encoded))), None)
    if isinstance(obj, dict) and not encoded:
        return next((p for k, v in obj.items() if (p := _value_problem(v, f"{where}.{k}", encoded))), None)
    if isinstance(obj, dict) and obj.keys() == {"__tensor__"} and isinstance(obj["__tensor__"], str):
        return None
    if isinstance(obj, dict) and obj.keys() == {"__dict__"} and isinstance(obj["__dict__"], list):
        for item in obj["__dict__"]:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], (int, str))
                    and not isinstance(item[0], bool)):
                return f"{where} holds a malformed entry"
            if (problem := _value_problem(item[1], f"{where}.{item[0]}", encoded)) is not None:
                return problem
        return None
    return f"{where} is not a saved value"


def _state_problem(body: Any, folder: Path) -> str | None:
    """Why a parsed state.json is not one `save_checkpoint` writes (types and ranges), or None."""
    if not isinstance(body, dict):
        return "state.json is not a checkpoint's"
    missing = [k for k in ("step", "optimizer", "lr_scheduler", "data", "extra") if k not in body]
    if missing:
        return f"state.json lacks {', '.join(missing)}"
    step = body["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"state.json's step {step!r} is not a whole number 0 or more"
    named = STEP_DIR.match(folder.name)
    if named and int(named.group(1)) != step:
        return f"state.json says step {step}, the folder's name step {named.group(1)}"
    files = body.get("files")
    if files is not None and (not isinstance(files, dict) or set(files) != set(TENSOR_FILES) or any(
            not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in files.values())):
        return f"state.json's files is not the sizes of {' and '.join(TENSOR_FILES)}"
    for key in ("optimizer", "lr_scheduler", "data", "extra"):
        encoded = key in ("optimizer", "lr_scheduler")
        if not isinstance(body[key], dict) or (encoded and body[key].keys() != {"__dict__"}):
            return f"state.json's {key} is not a saved state"
        if (problem := _value_problem(body[key], key, encoded)) is not None:
            return f"state.json: {problem}"
    return None


def _read_state(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(state.json's content, None) if it is a checkpoint's, else (None, why not)."""
    path = folder / "state.json"
    try:
        if path.stat().st_size > MAX_STATE_BYTES:
            return None, f"state.json has {path.stat().st_size} bytes, more than the {MAX_STATE_BYTES} a checkpoint's can"
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, "no state.json"
    except (OSError, ValueError) as e:
        return None, f"state.json is unreadable ({e})"
    if _nesting_depth(text) > MAX_STATE_DEPTH:
        return None, f"state.json nests deeper than {MAX_STATE_DEPTH} levels"
    try:
        body = json.loads(text)
    except ValueError as e:
        return None, f"state.json is unreadable ({e})"
    problem = _state_problem(body, folder)
    return (None, problem) if problem else (body, None)


def _complete_state(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(state.json's content, None) for a complete checkpoint, else (None, why not); tensors are not read."""
    body, problem = _read_state(folder)
    if body is None:
        return None, problem
    sizes = body.get("files") or {name: None for name in TENSOR_FILES}
    for name, size in sizes.items():
        path = folder / name
        if not path.is_file():
            return None, f"{name} is missing"
        if size is not None and path.stat().st_size != size:
            return None, f"{name} has {path.stat().st_size} bytes, state.json recorded {size}"
    return body, None


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is not a complete checkpoint (None if it is); tensors are not read."""
    return _complete_state(folder)[1]


def _warn_skipped(folder: Path, problem: str) -> None:
    """One warning line per damaged folder and process: listing happens at every save."""
    if (folder, problem) not in _warned:
        _warned.add((folder, problem))
        print(f"warning: skipping checkpoint {folder}: {problem}", file=sys.stderr)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Temp folders of an interrupted save are ignored; a step-N
    folder that is damaged or tampered with is skipped with a warning line saying why."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if (m := STEP_DIR.match(p.name)) and p.is_dir():
            problem = checkpoint_problem(p)
            if problem is None:
                found.append((int(m.group(1)), p))
            else:
                _warn_skipped(p, problem)
    return [p for _, p in sorted(found)]


def _non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    return next((k for k, t in tensors.items() if t.is_floating_point() and not bool(t.isfinite().all())), None)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint whose tensors are all finite (None if there is none); newer
    ones that fail are skipped with a warning line. A NaN checkpoint is never the last good one."""
    for folder in reversed(list_checkpoints(root)):
        try:
            bad = _non_finite(load_file(str(folder / "adapter.safetensors"))) or \
                _non_finite(load_file(str(folder / "state.safetensors")))
        except Exception as e:  # safetensors reports a damaged file with its own exception type
            _warn_skipped(folder, f"its tensors do not load ({type(e).__name__}: {e})")
            continue
        if bad is None:
            return folder
        _warn_skipped(folder, f"tensor {bad} holds NaN or infinite values")
    return None


def resolve_resume(resume: str, root: Path) -> Path | None:
    """`latest` -> `latest_checkpoint(root)`; else the named folder, which must be a complete checkpoint."""
    if resume == "latest":
        return latest_checkpoint(root)
    path = Path(resume)
    problem = checkpoint_problem(path) if path.is_dir() else "no such folder"
    if problem is not None:
        raise ValueError(f"config key 'resume': {path} is not a complete checkpoint folder ({problem})")
    return path


def load_checkpoint(folder: Path) -> TrainingState:
    """Read a checkpoint (JSON and safetensors only: nothing is unpickled); every check of
    `checkpoint_problem` applies, and every tensor must be finite."""
    def refuse(problem: str) -> ValueError:
        return ValueError(f"checkpoint {folder} is damaged and cannot be resumed from ({problem}); "
                          "name an older step-N folder with --resume")

    body, problem = _complete_state(folder)
    if body is None:
        raise refuse(str(problem))
    try:
        tensors = load_file(str(folder / "state.safetensors"))
        state = TrainingState(
            step=body["step"],
            adapter=load_file(str(folder / "adapter.safetensors")),
            optimizer=_join_tensors(body["optimizer"], tensors),
            lr_scheduler=_join_tensors(body["lr_scheduler"], tensors),
            generator=tensors["generator"],
            data=body["data"],
            extra=body["extra"],
        )
    except Exception as e:  # safetensors reports a damaged file with its own exception type
        raise refuse(f"{type(e).__name__}: {e}") from e
    if (bad := _non_finite(state.adapter) or _non_finite(tensors)) is not None:
        raise refuse(f"tensor {bad} holds NaN or infinite values")
    return state
