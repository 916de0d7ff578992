"""Image decoding: every PIL mode to upright 8-bit RGB, in a data module too.

Every dataset here is generated on disk and read through the same calls a user's configuration makes.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from data_helpers import make_classification_module, png_value, to_pixels
from PIL import Image

from mambaout_pl.data.images import read_rgb_image


def test_grayscale_and_alpha_convert_to_rgb():
    assert np.asarray(read_rgb_image(png_value(Image.new("L", (2, 2), 77)))).tolist() == [[[77] * 3] * 2] * 2
    la = Image.fromarray(np.array([[[100, 0], [100, 255], [100, 128]]], np.uint8), mode="LA")
    # alpha composited over white: 0 -> white, 255 -> the value, 128 -> (100*128 + 255*127) / 255
    assert np.asarray(read_rgb_image(png_value(la)))[0, :, 0].tolist() == [255, 100, 177]
    rgba = Image.fromarray(np.array([[[10, 20, 30, 255], [10, 20, 30, 0]]], np.uint8), mode="RGBA")
    assert np.asarray(read_rgb_image(png_value(rgba)))[0].tolist() == [[10, 20, 30], [255, 255, 255]]
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50])
    palette.putpixel((1, 0), 1)
    converted = read_rgb_image(png_value(palette, transparency=0))
    assert converted.mode == "RGB" and np.asarray(converted)[0].tolist() == [[255, 255, 255], [200, 100, 50]]


def test_16_bit_images_are_scaled_not_clipped():
    value = png_value(Image.fromarray(np.array([[0, 257 * 128, 65535]], dtype=np.uint16)))
    reopened = Image.open(io.BytesIO(value["bytes"]))
    assert reopened.mode.startswith("I")
    assert np.asarray(reopened.convert("RGB"))[0, 1, 0] == 255  # what PIL's convert would give
    assert np.asarray(read_rgb_image(value))[0, :, 0].tolist() == [0, 128, 255]


def test_cmyk_converts_to_rgb():
    cmyk = Image.new("CMYK", (3, 1))
    cmyk.putpixel((1, 0), (255, 0, 0, 0))  # cyan
    cmyk.putpixel((2, 0), (0, 0, 0, 255))  # black
    converted = np.asarray(read_rgb_image(png_value(cmyk, format="TIFF")))
    assert converted[0].tolist() == [[255, 255, 255], [0, 255, 255], [0, 0, 0]]


def _exif_rotated_png(width=3, height=2) -> dict:
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[0, 0] = (255, 0, 0)  # red top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return png_value(Image.fromarray(pixels), exif=exif)


def test_exif_orientation_is_applied():
    upright = read_rgb_image(_exif_rotated_png())
    assert upright.size == (2, 3)  # width and height swapped
    assert np.asarray(upright)[0, 1].tolist() == [255, 0, 0]  # top-left went to top-right
    assert np.asarray(upright)[..., 0].sum() == 255


def test_data_module_uses_the_conversions(tmp_path):
    folder = tmp_path / "modes" / "train"
    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
    Image.fromarray(np.full((16, 16), 257 * 100, np.uint16)).save(folder / "a" / "gray16.png")
    pixels = np.zeros((16, 32, 3), np.uint8)
    pixels[:, :16] = (250, 0, 0)  # left half red, right half blue as stored
    pixels[:, 16:] = (0, 0, 250)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(folder / "b" / "rotated.png", exif=exif)
    dm = make_classification_module(
        tmp_path, path="imagefolder", data_dir=str(folder.parent), val_split="train", image_size=16, crop_pct=1.0
    )
    batch = next(iter(dm.val_dataloader()))
    gray, rotated = to_pixels(batch["image"])
    assert torch.allclose(gray, torch.full_like(gray, 100.0), atol=0.5)  # scaled from 16 bits, not clipped to 255
    # Upright (rotated 90 degrees clockwise): red on top, blue at the bottom.
    assert rotated[0, :6].mean() > 240 and rotated[2, :6].mean() < 10
    assert rotated[2, -6:].mean() > 240 and rotated[0, -6:].mean() < 10
