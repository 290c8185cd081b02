"""Frozen helper models (VAE, text encoders, CLIP embedder) that wait on the CPU while training runs."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Offloadable:
    """Modules that live on `device` while they encode and may move to the CPU when the run no longer
    needs them (every encoding cached); the next use brings them back."""

    def __init__(self, modules: Sequence[nn.Module], device: torch.device) -> None:
        self.modules, self.device = list(modules), torch.device(device)
        self._on = self.device

    def ready(self) -> None:
        """Make sure the modules are on their device (call before using them)."""
        self._move(self.device)

    def offload(self) -> None:
        self._move(torch.device("cpu"))

    def _move(self, device: torch.device) -> None:
        if device == self._on:
            return
        for module in self.modules:
            module.to(device)
        self._on = device
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
