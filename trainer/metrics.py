"""Per-step metrics: accumulated on the device, read every few steps, written to metrics.jsonl."""
from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path

import torch

from .atomic import DiskFullError, is_disk_full, write_text


class MetricsMeter:
    """Sums detached metric tensors between reads (no host sync until `read`)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for name, value in metrics.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
            self.counts[name] = self.counts.get(name, 0) + 1

    def read(self) -> dict[str, torch.Tensor]:
        means = {n: s / self.counts[n] for n, s in self.sums.items()}
        self.sums, self.counts = {}, {}
        return means


class MetricsLog:
    """Append-only `metrics.jsonl` (one flushed line per logged step) and optional TensorBoard.

    On resume, lines past the resumed step (written after the checkpoint) and a line torn by a crash
    are dropped first (that rewrite is atomic); each new line is flushed and fsynced.
    """

    def __init__(self, path: Path, enabled: bool, after_step: int = 0, tensorboard: bool = False) -> None:
        self.path, self.enabled, self.writer = path, enabled, None
        if not enabled:
            return
        if path.exists():
            keep = [line for line in path.read_text(errors="replace").splitlines() if _step_of(line) <= after_step]
            write_text(path, "".join(line + "\n" for line in keep))
        self.file = open(path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(path.parent / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        try:
            self.file.write(json.dumps({"step": step, **metrics}) + "\n")
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as e:
            if not is_disk_full(e):
                raise
            # a line torn here is dropped on resume, like one torn by a crash
            raise DiskFullError(errno.ENOSPC, f"disk full while appending step {step} to {self.path}; the lines "
                                              "before it are intact. Free some space and continue with --resume "
                                              "latest") from None
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()


def logged_losses(path: Path) -> list[tuple[int, float]]:
    """(step, loss) of every complete line of a run's metrics.jsonl with a finite loss, in file order."""
    if not path.is_file():
        return []
    points = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
            step, loss = int(row["step"]), float(row["loss"])
        except (ValueError, KeyError, TypeError, RecursionError):
            continue
        if math.isfinite(loss):
            points.append((step, loss))
    return points


def _step_of(line: str) -> float:
    """The step of a metrics line; a line torn by a crash (kill -9, power cut) counts as past any step."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")


class Progress:
    """A tqdm bar with loss and implicit accuracy (main process only)."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, disable=not enabled, desc="training", unit="step")

    def update(self, step: int, metrics: dict[str, float]) -> None:
        self.bar.update(step - self.bar.n)
        shown = {k: f"{metrics[k]:.4g}" for k in ("loss", "implicit_acc", "reward_margin") if k in metrics}
        self.bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        self.bar.close()
