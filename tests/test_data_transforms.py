"""Image decoding and the shared resize / crop / flip."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data import BadImageError, ImageTransform, PreferenceExample, decode_image
from trainer.data.synthetic import encode


def gradient(width: int, height: int) -> Image.Image:
    """An image whose pixel values encode their position (x in red, y in green)."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8))


def pair(first: bytes, second: bytes) -> PreferenceExample:
    return PreferenceExample("p", (first, second), (1.0, 0.0), "data.parquet row 7")


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 0)), (255, 255, 255)),  # transparent -> white
        (lambda: Image.new("RGBA", (4, 4), (0, 0, 255, 255)), (0, 0, 255)),
        (lambda: Image.new("LA", (4, 4), (0, 128)), (127, 127, 127)),
        (lambda: Image.new("L", (4, 4), 200), (200, 200, 200)),
        (lambda: Image.new("1", (4, 4), 1), (255, 255, 255)),
        (lambda: Image.new("RGB", (4, 4), (10, 20, 30)).convert("P", palette=Image.Palette.ADAPTIVE), (10, 20, 30)),
        (lambda: Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16)), (156, 156, 156)),  # 16-bit
        (lambda: Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
    ],
)
def test_modes_become_rgb(make, expected):
    img = make()
    data = encode(img, "JPEG" if img.mode == "CMYK" else "PNG")
    rgb, (h, w) = decode_image(data, "x")
    assert rgb.mode == "RGB" and (h, w) == (4, 4)
    assert np.abs(np.asarray(rgb)[1, 1].astype(int) - expected).max() <= 3


def test_palette_with_transparency_composites_on_white():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((0, 0), 1)
    rgb, _ = decode_image(encode(img, "PNG", transparency=0), "x")
    assert tuple(np.asarray(rgb)[0, 0]) == (255, 0, 0) and tuple(np.asarray(rgb)[2, 2]) == (255, 255, 255)


def test_corrupt_image_names_source_and_role():
    good = encode(Image.new("RGB", (8, 8)))
    with pytest.raises(BadImageError, match=r"data.parquet row 7 \(rejected image\): image does not decode"):
        ImageTransform(8)(pair(good, b"\xff\xd8 definitely not a jpeg"), False, None)
    with pytest.raises(BadImageError, match=r"row 7 \(chosen image\)"):
        ImageTransform(8)(pair(good[: len(good) // 2], good), False, None)


def test_transform_names_an_image_the_way_its_row_does(monkeypatch):
    monkeypatch.setattr(PreferenceExample, "image_where", lambda self, k: f"<{self.source}, image {k}>")
    good = encode(Image.new("RGB", (8, 8)))
    with pytest.raises(BadImageError, match=r"<data.parquet row 7, image 1>: image does not decode"):
        ImageTransform(8)(pair(good, b"not an image"), False, None)


def test_decompression_bomb_is_refused():
    bomb = encode(Image.new("1", (9000, 9000)), "PNG")  # 81 Mpx in a few kB
    assert len(bomb) < 100_000
    with pytest.raises(BadImageError, match=r"9000x9000 = 81000000 pixels, above the limit of 67108864"):
        decode_image(bomb, "x")
    with pytest.raises(BadImageError, match="above the limit of 100"):
        ImageTransform(8, max_pixels=100)(pair(encode(Image.new("RGB", (20, 20))), encode(Image.new("RGB", (5, 5)))), False, None)


def test_output_range_shapes_and_time_ids():
    example = pair(encode(gradient(96, 64), "PNG"), encode(gradient(40, 80), "PNG"))
    out = ImageTransform(32)(example, False, None)
    assert out.pixels.shape == (2, 3, 32, 32) and out.pixels.dtype == torch.float32
    assert out.pixels.min() >= -1 and out.pixels.max() <= 1 and out.pixels.max() > 0.9
    # 96x64 -> 48x32, centre crop left 8; 40x80 -> 32x64, centre crop top 16
    assert out.time_ids.tolist() == [[64, 96, 0, 8, 32, 32], [80, 40, 16, 0, 32, 32]]
    assert out.labels.tolist() == [1.0, 0.0] and out.prompt == "p" and out.source == "data.parquet row 7"


def test_pair_of_different_sizes_gets_the_same_crop_and_flip():
    big, small = encode(gradient(200, 100), "PNG"), encode(gradient(100, 50), "PNG")
    transform = ImageTransform(32, center_crop=False)
    for seed in range(5):
        for flip in (False, True):
            out = transform(pair(big, small), flip, random.Random(seed))
            # same content at two scales: after resizing both are 64x32, so the crops must match
            assert out.time_ids[0, 2:].tolist() == out.time_ids[1, 2:].tolist()
            assert (out.pixels[0] - out.pixels[1]).abs().mean() < 0.03
            left = int(out.time_ids[0, 3])
            red = out.pixels[0, 0, 16]  # red encodes x; flipped images run right to left
            assert (red[0] > red[-1]).item() == flip
            first_column = 63 - left if flip else left  # of the resized, unflipped 64-wide image
            assert abs(red[0].item() * 127.5 + 127.5 - first_column * 255 / 63) < 6


def test_random_crop_depends_on_rng_and_centre_crop_does_not():
    example = pair(encode(gradient(128, 32), "PNG"), encode(gradient(128, 32), "PNG"))
    lefts = {int(ImageTransform(32, center_crop=False)(example, False, random.Random(s)).time_ids[0, 3]) for s in range(8)}
    assert len(lefts) > 3
    assert int(ImageTransform(32)(example, False, random.Random(0)).time_ids[0, 3]) == 48


def test_jpeg_draft_keeps_original_size_in_time_ids():
    out = ImageTransform(32)(pair(encode(gradient(512, 256)), encode(gradient(512, 256))), False, None)
    assert out.time_ids[0, :2].tolist() == [256, 512]


def test_exif_rotation_is_applied():
    img = gradient(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rgb, size = decode_image(encode(img, "JPEG", exif=exif), "x")
    assert rgb.size == (20, 40) and size == (40, 20)


def test_image_paths_decode(tmp_path):
    gradient(16, 16).save(tmp_path / "a.png")
    out = ImageTransform(16)(PreferenceExample("p", (tmp_path / "a.png",), (1.0,), "f line 1"), False, None)
    assert out.pixels.shape == (1, 3, 16, 16) and out.labels.tolist() == [1.0]
    with pytest.raises(BadImageError, match="f line 1"):
        ImageTransform(16)(PreferenceExample("p", (tmp_path / "missing.png",), (1.0,), "f line 1"), False, None)
