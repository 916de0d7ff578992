"""What a segmentation task shows and writes: a colour palette, image | truth | prediction pictures, PNG masks
and their legend."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image

from mambaout_pl.errors import OutputExistsError
from mambaout_pl.tasks.prediction_writer import PredictionWriter
from mambaout_pl.training.atomic import atomic_write
from mambaout_pl.training.run_folders import check_new_output


def palette(num_colours: int = 256) -> np.ndarray:
    """Distinct RGB colours, uint8 ``[num_colours, 3]``: the PASCAL VOC bit-interleaved palette (0 is black)."""
    colours = np.zeros((num_colours, 3), dtype=np.uint8)
    for index in range(num_colours):
        value, red, green, blue = index, 0, 0, 0
        for shift in range(7, -1, -1):
            red |= (value & 1) << shift
            green |= ((value >> 1) & 1) << shift
            blue |= ((value >> 2) & 1) << shift
            value >>= 3
        colours[index] = (red, green, blue)
    return colours


def colourise(labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """A label map ``[H, W]`` as float RGB ``[3, H, W]`` in [0, 1]; ignored pixels black."""
    colours = torch.from_numpy(palette(max(256, int(labels.max().item()) + 1))).float() / 255.0
    indices = labels.long().clamp_min(0)
    rgb = colours[indices].permute(2, 0, 1)
    return torch.where((labels == ignore_index)[None], torch.zeros_like(rgb), rgb)


def overlay_panel(
    image: torch.Tensor,
    mask: torch.Tensor | None,
    prediction: torch.Tensor,
    ignore_index: int = 255,
    max_side: int = 256,
) -> torch.Tensor:
    """``image | image + truth | image + prediction`` side by side, float ``[3, h, 3w]`` in [0, 1].

    ``image`` is a normalised ``[3, h', w']`` tensor, shown with its own range stretched to [0, 1];
    it is resized to the label maps' size ``[H, W]``, and the panel is shrunk so that its height and
    each third's width are at most ``max_side``. Without a ``mask``, the truth third is the image.
    """
    image = image.detach().float().cpu()
    prediction = prediction.detach().cpu()
    height, width = prediction.shape[-2:]
    low, high = image.amin(), image.amax()
    image = (image - low) / (high - low).clamp_min(1e-6)
    scale = min(1.0, max_side / max(height, width))
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]

    def shrink(labels: torch.Tensor) -> torch.Tensor:
        return F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].long()

    def blend(labels: torch.Tensor) -> torch.Tensor:
        labels = shrink(labels.cpu())
        coloured = 0.5 * image + 0.5 * colourise(labels, ignore_index)
        return torch.where((labels == ignore_index)[None], image, coloured)

    truth = blend(mask) if mask is not None else image
    return torch.cat([image, truth, blend(prediction)], dim=-1).clamp(0.0, 1.0)


def write_label_png(path: str | Path, labels: torch.Tensor | np.ndarray, exclusive: bool = False) -> None:
    """Write a label map as a palette PNG (pixel value = class index, coloured; 16-bit grey above 255 classes),
    never half-written (``exclusive``: never over an existing file)."""
    labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if labels.max(initial=0) > 255:
        image = Image.fromarray(labels.astype(np.uint16))
    else:
        image = Image.fromarray(labels.astype(np.uint8), mode="P")
        image.putpalette(palette(256).ravel().tolist())
    atomic_write(Path(path), lambda file: image.save(file, format="PNG"), exclusive=exclusive)


#: The colour key of the masks ``SegmentationMaskWriter`` writes, beside them.
LEGEND_FILE = "legend.csv"


def legend_rows(label_names: Sequence[str]) -> list[list[Any]]:
    """``[index, name, red, green, blue]`` per class: the colour of its pixels in :func:`write_label_png`'s masks."""
    colours = palette(max(256, len(label_names)))
    return [[index, name, *colours[index].tolist()] for index, name in enumerate(label_names)]


class SegmentationMaskWriter(PredictionWriter):
    """Write each prediction of ``trainer.predict`` to ``output_dir/<name>.png`` (see :func:`write_label_png`),
    ``<name>`` being the image's file name without its extension (under ``predict_images``, its path below
    their folder, so ``a/x.jpg`` and ``b/x.jpg`` give ``a/x.png`` and ``b/x.png``), or its row; and
    ``legend.csv``: ``index,name,red,green,blue`` per class of ``label_names``, the colours of the masks.

    ``output_dir`` ``None``: ``<trainer.log_dir>/predict``, the run's version folder. A mask file that
    exists already, an earlier run's or one of another image with the same name, is never overwritten
    (:class:`~mambaout_pl.errors.OutputExistsError`).
    """

    def __init__(self, output_dir: str | Path | None = None, label_names: Sequence[str] | None = None) -> None:
        super().__init__(output_dir)
        self.label_names = None if label_names is None else list(label_names)
        self.folder: Path | None = None  # the folder written to, once predicting
        self._written = 0
        self._names: set[str] = set()  # mask names this run has written

    def reserved_output(self, folder: Path) -> Path:
        return folder / "*.png"

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.folder = self.output_folder(trainer)
        if self.label_names:
            check_new_output(self.folder / LEGEND_FILE)
        self._written = 0
        self._names = set()

    def write_batch(self, trainer: Trainer, prediction: Any, batch: Any, batch_indices: Sequence[int] | None) -> None:
        for name, labels in zip(prediction["name"], prediction["prediction"], strict=True):
            path = self.folder / f"{name}.png"
            if name in self._names:
                raise OutputExistsError(
                    f"Two images to predict are named {name!r} (their file names without extension), so both masks "
                    f"would be '{path}', and the second would overwrite the first. Rename one of them, or predict "
                    "them separately."
                )
            check_new_output(path)
            self._names.add(name)
            write_label_png(path, labels, exclusive=True)
            self._written += 1

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.label_names and trainer.is_global_zero:
            write_legend(self.folder / LEGEND_FILE, self.label_names)
        count = f"{self._written} label maps" if trainer.world_size == 1 else "Label maps"
        rank_zero_info(f"{count} written to {self.folder}")


def write_legend(path: Path, label_names: Sequence[str]) -> None:
    """Write :func:`legend_rows` as CSV with a header, never over an existing file."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["index", "name", "red", "green", "blue"])
    writer.writerows(legend_rows(label_names))
    atomic_write(path, lambda file: file.write(text.getvalue().encode()), exclusive=True)
