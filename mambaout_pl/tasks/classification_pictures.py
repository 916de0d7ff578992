"""Pictures of a few validation images with their true and predicted classes, once per validation epoch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from PIL import Image, ImageDraw, ImageFont

from mambaout_pl.tasks.validation_pictures import log_pictures, save_pictures

#: Colours of the predicted class's line: right, wrong.
RIGHT, WRONG = (20, 130, 40), (190, 30, 30)


def classification_panel(
    image: torch.Tensor,
    label: int | None,
    probabilities: torch.Tensor,
    label_names: Sequence[str] | None = None,
    side: int = 160,
) -> torch.Tensor:
    """``image`` above its true class and its most probable class with its probability, float ``[3, H, W]`` in [0, 1].

    ``image`` is a normalised ``[3, h, w]`` tensor, shown with its own range stretched to [0, 1] and
    resized so that its longer side is ``side`` (nearest when enlarged, so small images stay sharp).
    The prediction is green when it is the true class, red otherwise.
    """
    image = image.detach().float().cpu()
    low, high = image.amin(), image.amax()
    image = (image - low) / (high - low).clamp_min(1e-6)
    scale = side / max(image.shape[-2:])
    size = (max(1, round(image.shape[-2] * scale)), max(1, round(image.shape[-1] * scale)))
    image = F.interpolate(image[None], size=size, mode="nearest" if scale > 1 else "bilinear")[0].clamp(0.0, 1.0)
    predicted = int(probabilities.argmax())

    def name(index: int) -> str:
        return label_names[index] if label_names and index < len(label_names) else str(index)

    font = ImageFont.load_default(size=14)
    line_height = 18
    lines = [] if label is None else [(f"truth: {name(label)}", (0, 0, 0))]
    colour = (0, 0, 0) if label is None else RIGHT if predicted == label else WRONG
    lines.append((f"predicted: {name(predicted)} {float(probabilities[predicted]):.0%}", colour))
    width = max(size[1], side)
    canvas = Image.new("RGB", (width, size[0] + 6 + line_height * len(lines)), "white")
    pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    canvas.paste(Image.fromarray(pixels), ((width - size[1]) // 2, 0))
    draw = ImageDraw.Draw(canvas)
    for row, (text, fill) in enumerate(lines):
        draw.text((4, size[0] + 4 + row * line_height), text, fill=fill, font=font)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255.0


class ClassificationPictures(Callback):
    """Draw the first ``num_images`` validation images of each validation epoch (rank 0, never in the sanity
    check) with :func:`classification_panel`, log them as ``val/examples`` and save them in the run folder.

    Args:
        num_images: images drawn per validation epoch (0: none).
        label_names: class names, index-aligned.
    """

    def __init__(self, num_images: int = 4, label_names: Sequence[str] | None = None) -> None:
        self.num_images = num_images
        self.label_names = list(label_names) if label_names else None
        self._panels: list[torch.Tensor] = []

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._panels = []

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        wanted = self.num_images - len(self._panels)
        if wanted <= 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        images, labels = pl_module.unpack_batch(batch, "image", "label")
        images = images[:wanted]
        probabilities = F.softmax(pl_module(images).float(), dim=-1).cpu()
        for index, image in enumerate(images):
            label = None if labels is None else int(labels[index])
            self._panels.append(classification_panel(image, label, probabilities[index], self.label_names))

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._panels:
            log_pictures(pl_module, "val/examples", self._panels)
            save_pictures(trainer, self._panels)
        self._panels = []
