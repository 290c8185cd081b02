"""Shared pieces of the trainer benchmarks: data, the interleaved step timer, the floor, peak memory.

The trainer's step time is measured inside `trainer.loop.train` itself: with `log_every = N`, the
`on_step` hook fires every N optimiser steps. Right after each interval the hook runs N iterations of
the *floor* (bare UNet forward+backward on the same batch shape, plus the no-grad reference forward
where the method needs one) on the same model, so trainer and floor intervals alternate in time and
a loaded machine slows both alike. Ratios are medians of adjacent (trainer, floor) interval pairs.
"""
from __future__ import annotations

import ctypes
import gc
import io
import os
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from trainer.data.records import PreferenceExample  # noqa: E402


# --- data ------------------------------------------------------------------------------------------
def _png(rng: np.random.Generator, colour: tuple[int, int, int], size: int) -> bytes:
    from PIL import Image

    pixels = (rng.random((size, size, 3)) * 40).astype(np.uint8) + np.array(colour, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def make_pairs(n: int, size: int, seed: int = 0) -> list[PreferenceExample]:
    """n synthetic pairs of size x size PNGs (chosen reddish, rejected bluish), varied prompts."""
    rng = np.random.default_rng(seed)
    prompts = ["a red square", "a small square on grey", "a bright square", "a square in the evening light"]
    return [PreferenceExample(prompts[i % len(prompts)], (_png(rng, (200, 20, 20), size), _png(rng, (20, 20, 200), size)),
                              (1.0, 0.0), f"bench row {i}") for i in range(n)]


def make_unpaired(n: int, size: int, seed: int = 0) -> list[PreferenceExample]:
    rng = np.random.default_rng(seed)
    return [PreferenceExample("a square", (_png(rng, (200, 20, 20) if i % 2 == 0 else (20, 20, 200), size),),
                              (1.0 if i % 2 == 0 else 0.0,), f"bench row {i}") for i in range(n)]


# --- methods ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodCase:
    label: str  # as shown in the tables
    name: str  # registry name
    args: dict = field(default_factory=dict)


def method_cases(include_ncp: bool = True) -> list[MethodCase]:
    from trainer.methods import method_names

    cases = [MethodCase(n, n) for n in method_names()]
    if include_ncp:
        cases.append(MethodCase("dpo (space=ncp)", "dpo", {"space": "ncp"}))
    return cases


def needs_reference(case: MethodCase) -> bool:
    from trainer.methods import build_method
    from trainer.methods.base import PREDICTIONS

    method = build_method(case.name, case.args)
    return method.needs_reference or PREDICTIONS in method.needs


def autocast_for(mixed_precision: str, device: torch.device):
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the floor -------------------------------------------------------------------------------------
def make_floor(backend, case: MethodCase, batch, mixed_precision: str = "no") -> Callable[[], None]:
    """One floor iteration on `batch`'s shapes (a TrainBatch as the trainer sees it, chosen-first).

    Latent space: policy forward + backward on the images the method trains on (2B for pairs, B for
    sft/unpaired) and, where the method needs the reference, one no-grad forward with the adapter
    off. NCP space additionally does what NCP needs at minimum: two no-grad encoder passes (true and
    reference posterior steps) and one encoder pass with grad on the policy's, backpropagated.
    """
    from trainer.methods import build_method
    from trainer.ncp import posterior_step
    from trainer.step import chosen_half, draw_noise

    method = build_method(case.name, case.args)
    device = backend.device
    noise = draw_noise(method, batch.latents.shape, batch.paired, backend.timestep_sampling,
                       torch.Generator().manual_seed(99))
    if batch.paired and not method.uses_rejected:
        batch, noise = chosen_half(batch, noise)
    latents = batch.latents.to(device)
    cond = {k: v.to(device) for k, v in batch.cond.items()}
    t, eps, var = noise.timesteps.to(device), noise.noise.to(device), noise.variance_noise.to(device)
    noisy = backend.add_noise(latents, eps, t).to(backend.weight_dtype)
    kwargs = backend._unet_kwargs(cond)
    unet, params = backend.model, backend.trainable_parameters()
    ref = needs_reference(case)
    ncp = method.error_space == "ncp"
    autocast = autocast_for(mixed_precision, device)
    ac = backend.alphas_cumprod.to(device)
    t_prev = (t - 1).clamp(min=0)

    def once() -> None:
        with autocast:
            pred = unet(noisy, t, **kwargs).sample
            if ref:
                with torch.no_grad(), backend.reference():
                    unet(noisy, t, **kwargs)
            if ncp:
                with torch.no_grad():
                    true = backend.encoder_features(posterior_step(ac, noisy.float(), eps, t, var), t_prev, cond)
                    backend.encoder_features(posterior_step(ac, noisy.float(), eps, t, var), t_prev, cond)
                feats = backend.encoder_features(posterior_step(ac, noisy.float(), pred.float(), t, var), t_prev, cond)
                loss = ((feats - true) ** 2).mean()
            else:
                loss = ((pred.float() - eps) ** 2).mean()
        loss.backward()
        for p in params:
            p.grad = None

    return once


# --- the interleaved timer -------------------------------------------------------------------------
class InterleavedTimer:
    """`on_step` hook for `train` with log_every = every: after each interval of `every` trainer steps
    (skipping the first `warmup` intervals) it times `every` floor iterations."""

    def __init__(self, floor: Callable[[], None] | None, every: int, warmup: int, device: torch.device):
        self.floor, self.every, self.warmup, self.device = floor, every, warmup, device
        self.trainer: list[float] = []
        self.floors: list[float] = []
        self.intervals = 0
        self.last: float | None = None

    def __call__(self, report) -> None:
        now = time.perf_counter()  # the loop has just read the metrics: the device is idle
        if self.last is not None and self.intervals >= self.warmup:
            self.trainer.append((now - self.last) / self.every)
            if self.floor is not None:
                sync(self.device)
                start = time.perf_counter()
                for _ in range(self.every):
                    self.floor()
                sync(self.device)
                self.floors.append((time.perf_counter() - start) / self.every)
        self.intervals += 1
        self.last = time.perf_counter()

    def ratio(self) -> float:
        return statistics.median(a / b for a, b in zip(self.trainer, self.floors))

    def ratio_of_minimums(self) -> float:
        """min(trainer) / min(floor): the least-disturbed intervals (robust on a loaded machine)."""
        return min(self.trainer) / min(self.floors)

    def ratio_spread(self) -> tuple[float, float]:
        """The quartiles of the per-pair ratios."""
        ratios = sorted(a / b for a, b in zip(self.trainer, self.floors))
        if len(ratios) < 4:
            return ratios[0], ratios[-1]
        q = statistics.quantiles(ratios, n=4)
        return q[0], q[2]

    def step_s(self) -> float:
        return statistics.median(self.trainer)

    def floor_s(self) -> float:
        return statistics.median(self.floors)


# --- memory ----------------------------------------------------------------------------------------
def trim_host_memory() -> None:
    """Return freed heap to the OS so a later peak-RSS reading starts from the live size."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - not glibc
        pass


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """`before`: MiB held on entry; `peak`: the most held inside (set on exit). CUDA: allocated memory;
    CPU: RSS, with freed heap returned to the OS and the kernel's peak mark (VmHWM) reset on entry."""
    trim_host_memory()
    out: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        out["before"] = torch.cuda.memory_allocated(device) / 2**20
    else:
        reset_peak_rss()
        out["before"] = current_rss_mib()
    yield out
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["peak"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        out["peak"] = peak_rss_mib()


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_note(start: tuple[float, float, float]) -> str:
    """The machine's 1-minute load average at the start and end of a run (ratios still hold; absolute
    times on a loaded machine do not)."""
    end = os.getloadavg()
    return f"Load average {start[0]:.1f} at the start, {end[0]:.1f} at the end ({os.cpu_count()} CPUs)."


def fmt(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}"
