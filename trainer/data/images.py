"""Opening untrusted images: the only place the trainer (and the pack's pair store) hands bytes to Pillow.

Only the formats preference datasets hold are decoded. Pillow otherwise picks a plugin from the
file's first bytes, and its EPS plugin runs Ghostscript on the PostScript inside, so a dataset
cell could run a program wherever Ghostscript is installed; other plugins (TIFF, PSD, ...) add
attack surface for no dataset anyone trains on. Size limits are read from the header, before a
single pixel is decoded.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageMode

from ..limits import MAX_IMAGE_BYTES, MAX_PIXELS
from .errors import BadImageError

#: Pillow format names decoded. PNG, JPEG (Pillow also reads camera JPEGs with several pictures,
#: MPO, through the JPEG plugin) and WebP cover Pick-a-Pic, HF image datasets and ComfyUI outputs.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")


def open_image(image: bytes | Path) -> Image.Image:
    """`Image.open` that offers the bytes to the plugins of IMAGE_FORMATS only (header read, pixels not decoded)."""
    return Image.open(io.BytesIO(image) if isinstance(image, bytes) else Path(image), formats=list(IMAGE_FORMATS))


def decoded_bytes(img: Image.Image) -> int:
    """Bytes of samples the image decodes to: width x height x bands x bytes per sample."""
    mode = ImageMode.getmode(img.mode)
    sample = np.dtype(mode.typestr).itemsize
    if sample == 1 and any(";16" in str(tile.args) for tile in getattr(img, "tile", None) or ()):
        sample = 2  # 16-bit samples that Pillow narrows to 8 bits as it decodes (PNG RGB, RGBA, LA)
    return img.width * img.height * len(mode.bands) * sample


def check_image_size(img: Image.Image, where: str, max_pixels: int = MAX_PIXELS,
                     max_bytes: int = MAX_IMAGE_BYTES) -> None:
    """Refuse an opened (not yet decoded) image above either limit, with a BadImageError naming `where`."""
    w, h = img.size
    if w * h > max_pixels:
        raise BadImageError(f"{where}: image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels} "
                            "(decompression bomb?); raise max_pixels to accept it")
    size = decoded_bytes(img)
    if size > max_bytes:
        raise BadImageError(f"{where}: image is {w}x{h} {img.mode} and decodes to {size} bytes, above the limit "
                            f"of {max_bytes} (decompression bomb?); raise max_image_bytes to accept it")


def png_bytes(image: Image.Image) -> bytes:
    """An image as PNG file bytes (what the pair store, the pack's previews and generated pair datasets hold)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=4)
    return buf.getvalue()
