"""Image decoding and the shared resize / crop / flip of a pair."""
from __future__ import annotations

import math
import random
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..limits import MAX_IMAGE_BYTES, MAX_PIXELS
from .errors import BadImageError
from .images import IMAGE_FORMATS, check_image_size, open_image
from .records import ImageSource, PreferenceExample, ProcessedExample

#: Pixels converted at a time: a huge image costs its decoded size plus the 8-bit RGB result, not
#: a float or 64-bit copy of it.
_STRIP_PIXELS = 2**20
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _strip_to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB: alpha composited on white, 16-bit scaled down, palette / CMYK / grey converted."""
    if img.mode in _SIXTEEN_BIT:  # a 16-bit grey PNG (older Pillow opens it as "I")
        wide = np.clip(np.asarray(img), 0, 65535).astype(np.uint32)  # one strip: small
        img = Image.fromarray(((wide + 128) // 257).astype(np.uint8), "L")  # round(x / 257): 65535 -> 255
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _to_rgb(img: Image.Image) -> Image.Image:
    """`_strip_to_rgb` a band of rows at a time into one RGB image (the image itself when already RGB)."""
    if img.mode == "RGB":
        return img
    w, h = img.size
    rows = max(1, _STRIP_PIXELS // w)
    if rows >= h:
        return _strip_to_rgb(img)
    out = Image.new("RGB", (w, h))
    for top in range(0, h, rows):
        out.paste(_strip_to_rgb(img.crop((0, top, w, min(h, top + rows)))), (0, top))
    return out


def decode_image(
    image: ImageSource, where: str, max_pixels: int = MAX_PIXELS, draft_size: int | None = None,
    max_bytes: int = MAX_IMAGE_BYTES,
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode to 8-bit RGB with EXIF orientation applied; also return the original (h, w).

    Anything that fails raises BadImageError naming `where`; a format outside IMAGE_FORMATS, or an
    image above `max_pixels` or `max_bytes` of decoded samples, is refused before its pixels are
    decoded. `draft_size` lets a JPEG decode at a reduced scale whose shorter side stays at least
    `draft_size` (much faster for large images). Peak memory is about the decoded image plus its
    RGB copy (4 bytes a pixel)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = open_image(image)
            check_image_size(img, where, max_pixels, max_bytes)
            w, h = img.size
            original = (w, h) if img.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (h, w)
            if draft_size is not None and img.format == "JPEG":
                scale = draft_size / min(w, h)
                img.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
            ImageOps.exif_transpose(img, in_place=True)  # decodes; copies only an image it turns
            return _to_rgb(img), original
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError(f"{where}: image does not decode as any accepted format ({', '.join(IMAGE_FORMATS)})") from None
    except Exception as e:  # malformed files raise many kinds of errors inside Pillow's plugins
        raise BadImageError(f"{where}: image does not decode: {type(e).__name__}: {e}") from None


class ImageTransform:
    """Decode the images of a row, resize each (shorter side to `resolution`), crop a square.

    Both images of a pair get the same relative crop position and the same flip, so that
    corresponding pixels stay aligned even when the two images differ in size. Crops are
    centred, or drawn from `crop_rng` when `center_crop` is False. `time_ids` per image follow
    SDXL: (original h, original w, crop top, crop left, resolution, resolution), where the crop
    offsets are in the resized image and, after a flip, measured in the flipped image.
    """

    def __init__(self, resolution: int, center_crop: bool = True, max_pixels: int = MAX_PIXELS,
                 max_bytes: int = MAX_IMAGE_BYTES):
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.resolution = resolution
        self.center_crop = center_crop
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes

    def __call__(self, example: PreferenceExample, flip: bool, crop_rng: random.Random | None) -> ProcessedExample:
        if self.center_crop or crop_rng is None:
            fy = fx = 0.5
        else:
            fy, fx = crop_rng.random(), crop_rng.random()
        pixels, time_ids = [], []
        for k, image in enumerate(example.images):
            where = example.image_where(k)
            img, original = decode_image(image, where, self.max_pixels, self.resolution, self.max_bytes)
            tensor, ids = self._resize_crop(img, original, fy, fx, flip, where)
            pixels.append(tensor)
            time_ids.append(ids)
        return ProcessedExample(
            prompt=example.prompt,
            pixels=torch.stack(pixels),
            time_ids=torch.tensor(time_ids, dtype=torch.float32),
            labels=torch.tensor(example.labels, dtype=torch.float32),
            source=example.source,
        )

    def _resize_crop(
        self, img: Image.Image, original: tuple[int, int], fy: float, fx: float, flip: bool, where: str
    ) -> tuple[torch.Tensor, list[int]]:
        res = self.resolution
        orig_h, orig_w = original
        scale = res / min(orig_w, orig_h)
        w, h = max(res, round(orig_w * scale)), max(res, round(orig_h * scale))
        try:
            img = img.resize((w, h), Image.Resampling.BICUBIC)
        except (OSError, ValueError) as e:
            raise BadImageError(f"{where}: image does not resize: {e}") from None
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            fx = 1.0 - fx
        top, left = round(fy * (h - res)), round(fx * (w - res))
        img = img.crop((left, top, left + res, top + res))
        array = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        return array.float().div_(127.5).sub_(1.0), [orig_h, orig_w, top, left, res, res]
