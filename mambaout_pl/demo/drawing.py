"""What the demo shows: an image with its coloured label map and a legend, or with its detections drawn."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from mambaout_pl.tasks.detection_outputs import draw_detections
from mambaout_pl.tasks.segmentation_outputs import palette

__all__ = ["class_shares", "detection_picture", "mask_picture"]


def class_shares(labels: np.ndarray, label_names: Sequence[str] | None = None) -> dict[str, float]:
    """``{class name: share of the pixels}`` of the classes in the label map ``labels``, largest first."""
    values, counts = np.unique(labels, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    total = labels.size
    names = label_names or []
    return {
        (names[value] if 0 <= value < len(names) else str(value)): count / total
        for value, count in zip(values[order].tolist(), counts[order].tolist())
    }


def mask_picture(
    image: Image.Image,
    labels: np.ndarray,
    label_names: Sequence[str] | None = None,
    opacity: float = 0.5,
    min_height: int = 256,
) -> Image.Image:
    """``image`` with the label map ``labels`` ([H, W] class indices) blended over it in the palette's colours,
    and a legend beside it: each class present, its colour and its share of the pixels, largest first.

    Small images are enlarged (nearest) to at least ``min_height`` pixels high, to stay legible.
    """
    pixels = np.asarray(image.convert("RGB")).astype(np.float32)
    colours = palette(max(256, int(labels.max(initial=0)) + 1))
    blended = ((1 - opacity) * pixels + opacity * colours[labels]).round().astype(np.uint8)
    picture = Image.fromarray(blended)
    if picture.height < min_height:
        factor = -(-min_height // picture.height)
        picture = picture.resize((picture.width * factor, picture.height * factor), Image.Resampling.NEAREST)
    font = ImageFont.load_default(size=15)
    line, swatch = 22, 14
    values, counts = np.unique(labels, return_counts=True)
    entries = sorted(zip(counts.tolist(), values.tolist()), reverse=True)
    names = label_names or []
    texts = [
        (value, f"{names[value] if value < len(names) else value}  {count / labels.size:.1%}")
        for count, value in entries
    ]
    legend_width = 24 + swatch + max(int(font.getlength(text)) for _, text in texts)
    height = max(picture.height, 8 + line * len(texts))
    canvas = Image.new("RGB", (picture.width + legend_width, height), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, (value, text) in enumerate(texts):
        left, top = picture.width + 10, 6 + row * line
        draw.rectangle(
            (left, top, left + swatch, top + swatch), fill=tuple(int(c) for c in colours[value]), outline="black"
        )
        draw.text((left + swatch + 6, top - 1), text, fill="black", font=font)
    return canvas


def detection_picture(
    image: Image.Image,
    objects: Mapping[str, torch.Tensor],
    names: Mapping[int, str] | None = None,
    score_threshold: float = 0.5,
) -> Image.Image:
    """``image`` with the boxes, labels with scores, and masks of ``objects`` scoring at least ``score_threshold``."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).float() / 255.0
    drawn = draw_detections(pixels, objects, names, score_threshold)
    return Image.fromarray(drawn.permute(1, 2, 0).numpy())
