"""Conversions between ComfyUI IMAGE tensors ([B, H, W, C] float in 0..1) and PNG bytes / PIL."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..trainer.data.images import png_bytes


def tensor_to_pils(images: torch.Tensor) -> list[Image.Image]:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError("expected an IMAGE batch [B, H, W, C]")
    arr = (images.detach().float().cpu().clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
    out = []
    for a in arr:
        if a.shape[-1] == 1:
            a = np.repeat(a, 3, axis=-1)
        out.append(Image.fromarray(a[..., :3], "RGB"))
    return out


def tensor_to_pngs(images: torch.Tensor) -> list[bytes]:
    return [png_bytes(im) for im in tensor_to_pils(images)]


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """One PIL image -> IMAGE batch of 1."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy())[None]
