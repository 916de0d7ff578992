"""Decode stored images: ``datasets.Image(decode=False)`` values, paths or PIL images, to upright RGB."""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from datasets.utils.file_utils import xopen
from PIL import Image, ImageOps

from mambaout_pl.data.errors import CorruptImageError


def open_image(value: Any) -> Image.Image:
    """Open an image stored as ``datasets.Image(decode=False)`` gives it: ``{"bytes", "path"}``.

    Also accepts a path string or a PIL image. The pixels are read now, so a truncated or
    corrupt file fails here. Raises :class:`CorruptImageError` naming the file.
    """
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (str, os.PathLike)):
        value = {"bytes": None, "path": os.fspath(value)}
    data, path = value.get("bytes"), value.get("path")
    where = path or "<in-memory bytes>"
    try:
        if data is not None:
            image = Image.open(io.BytesIO(data))
        elif path is None:
            raise ValueError("the row has neither image bytes nor a path")
        elif "://" in path or "::" in path:
            with xopen(path, "rb") as file:
                image = Image.open(io.BytesIO(file.read()))
        else:
            image = Image.open(path)
        image.load()
    except Exception as error:
        raise CorruptImageError(f"Cannot decode image {where}: {error}") from error
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation and convert any PIL mode to 8-bit RGB.

    Transparency is composited over white; 16- and 32-bit integer images are scaled from their
    16-bit range to 8 bits (PIL's own ``convert`` would clip them); CMYK uses PIL's conversion.
    """
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        pixels = np.asarray(image, dtype=np.float64)
        pixels = np.clip(np.rint(pixels / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(pixels, mode="L").convert("RGB")
    if mode == "F":
        pixels = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(pixels, mode="L").convert("RGB")
    if (mode == "P" and "transparency" in image.info) or mode == "PA":
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def read_rgb_image(value: Any) -> Image.Image:
    """Open a stored image (see :func:`open_image`) as an upright 8-bit RGB PIL image."""
    image = open_image(value)
    try:
        return to_rgb(image)
    except Exception as error:
        where = value.get("path") if isinstance(value, dict) else value
        raise CorruptImageError(f"Cannot convert image {where} (mode {image.mode}) to RGB: {error}") from error
