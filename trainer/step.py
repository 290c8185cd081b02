"""One training step's model work: noise a batch, run policy (and reference), hand errors to the method.

This is the only place that turns a `TrainBatch` into `StepOutputs`; it knows methods only through
their declared needs, never by name.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import Tensor

from .data.records import TrainBatch
from .forward_process import TimestepSampling
from .methods.base import EMBEDDINGS, PREDICTIONS, RESIDUALS, Method, StepOutputs
from .models.backend import Backend, Cond
from .ncp import ncp_errors

@dataclass
class Noise:
    """Timesteps and noise for the images of one batch (shared within a pair when the method asks)."""

    timesteps: Tensor
    noise: Tensor
    variance_noise: Tensor  # for NCP's posterior step

    def take(self, rows: slice | Tensor) -> "Noise":
        return Noise(self.timesteps[rows], self.noise[rows], self.variance_noise[rows])


def draw_noise(method: Method, batch_shape: torch.Size, paired: bool, sampling: TimestepSampling,
               generator: torch.Generator) -> Noise:
    """Draw on the CPU generator (reproducible, identical on every rank), chosen-first layout; timesteps from
    the backend's `sampling` (the family's) unless the method draws its own."""
    n = batch_shape[0]
    share = paired and method.shared_noise
    draws = n // 2 if share else n
    t = method.sample_timesteps(draws, sampling, generator)
    noise = torch.randn((draws, *batch_shape[1:]), generator=generator)
    var = torch.randn((draws, *batch_shape[1:]), generator=generator)
    if share:
        t, noise, var = t.repeat(2), noise.repeat(2, 1, 1, 1), var.repeat(2, 1, 1, 1)
    return Noise(t, noise, var)


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    return ((pred.float() - target.float()) ** 2).flatten(1).mean(1)


def chosen_half(batch: TrainBatch, noise: Noise) -> tuple[TrainBatch, Noise]:
    """The chosen rows of a paired batch (for methods that never look at the rejected image)."""
    half = slice(0, batch.latents.shape[0] // 2)
    sub = TrainBatch(batch.latents[half], {k: v[half] for k, v in batch.cond.items()}, batch.labels[half],
                     batch.prompts[half], paired=False)
    return sub, noise.take(half)


def to_device(x: Tensor, device: torch.device) -> Tensor:
    """Host -> GPU through pinned memory, asynchronously: a copy from pageable memory would first wait
    for all queued GPU work (a host-device sync every step). Same values; elsewhere a plain `.to`."""
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def compute_outputs(backend: Backend, method: Method, batch: TrainBatch, noise: Noise) -> StepOutputs:
    """Run the model(s) the method needs and return its inputs."""
    if batch.paired and not method.uses_rejected:
        batch, noise = chosen_half(batch, noise)
    device = backend.device
    latents = to_device(batch.latents, device)
    cond: Cond = {k: to_device(v, device) for k, v in batch.cond.items()}
    t, eps = to_device(noise.timesteps, device), to_device(noise.noise, device)
    noisy = backend.add_noise(latents, eps, t)
    target = backend.target(latents, eps, t)
    pred = backend.predict(noisy, t, cond)
    ref_pred = None
    if method.needs_reference or PREDICTIONS in method.needs:
        with torch.no_grad(), backend.reference():
            ref_pred = backend.predict(noisy, t, cond)
    if method.error_space == "ncp":
        err, ref_err = ncp_errors(backend, noisy, t, cond, pred, ref_pred if method.needs_reference else None,
                                  target, to_device(noise.variance_noise, device))
    else:
        err = per_sample_mse(pred, target)
        ref_err = per_sample_mse(ref_pred, target) if method.needs_reference else None
    out = StepOutputs(err=err, timesteps=t, labels=to_device(batch.labels, device), ref_err=ref_err)
    if PREDICTIONS in method.needs:
        out.pred, out.ref_pred, out.target = pred, ref_pred, target
    elif RESIDUALS in method.needs:
        out.pred, out.target = pred, target
    if EMBEDDINGS in method.needs:
        out.prompt_emb = cond.get("embed_text", cond.get("pooled"))
        out.image_emb = cond.get("embed_image")
    return out
