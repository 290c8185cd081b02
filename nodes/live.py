"""Live training state shared by the Train node, the status route and the browser messages.

The browser gets `prefalign.train` messages while it is open and reads `/prefalign/train/status`
after a reload, so a refreshed page recovers the loss curve.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

from . import comfy_env

MAX_POINTS = 2000  # loss points kept per run (downsampled beyond that)

_lock = threading.Lock()
_runs: dict[str, dict] = {}  # node id -> state


def start(node_id: str | None, prompt_id: str | None, total: int, method: str) -> dict:
    state = {
        "node": node_id, "prompt_id": prompt_id, "method": method, "step": 0, "total": int(total),
        "loss": [], "status": "running", "started": time.time(), "lora": None, "message": "",
    }
    with _lock:
        _runs[str(node_id)] = state
    comfy_env.send("train", {k: v for k, v in state.items() if k != "loss"} | {"points": []})
    return state


def resume(state: dict, points: list[tuple[int, float]]) -> None:
    """A resumed run's chart starts with the steps its earlier sessions logged."""
    with _lock:
        state["loss"] = [[int(s), float(v)] for s, v in points][-MAX_POINTS:]
        state["step"] = state["loss"][-1][0] if state["loss"] else 0
        payload = {"node": state["node"], "prompt_id": state["prompt_id"], "step": state["step"],
                   "total": state["total"], "status": "running", "points": list(state["loss"])}
    comfy_env.send("train", payload)


def step(state: dict, step: int, loss: float | None, metrics: dict | None = None) -> None:
    point = None
    with _lock:
        state["step"] = int(step)
        if loss is not None:
            point = [int(step), float(loss)]
            # a resumed run retrains the steps logged after its checkpoint: the new values replace them
            while state["loss"] and state["loss"][-1][0] >= step:
                state["loss"].pop()
            state["loss"].append(point)
            if len(state["loss"]) > MAX_POINTS:
                state["loss"] = state["loss"][::2]
    payload = {"node": state["node"], "prompt_id": state["prompt_id"], "step": int(step), "total": state["total"],
               "status": "running", "points": [point] if point else []}
    if metrics:
        payload["metrics"] = {k: float(v) for k, v in metrics.items()}
    comfy_env.send("train", payload)


def finish(state: dict, status: str, lora: str | None = None, message: str = "") -> None:
    with _lock:
        state.update(status=status, lora=lora, message=message, finished=time.time())
    comfy_env.send("train", {"node": state["node"], "prompt_id": state["prompt_id"], "step": state["step"],
                             "total": state["total"], "status": status, "lora": lora, "message": message, "points": []})


@contextmanager
def ended_on_error(state: dict) -> Iterator[None]:
    """A run that raises ends its chart: "stopped" on Cancel, else "error" with the message (never left "running")."""
    try:
        yield
    except Exception as e:
        if state["status"] == "running":
            interrupted = comfy_env.is_interrupt(e)
            finish(state, "stopped" if interrupted else "error",
                   message="cancelled before the first step" if interrupted else str(e))
        raise


def snapshot() -> dict:
    with _lock:
        return {k: {**v, "loss": list(v["loss"])} for k, v in _runs.items()}
