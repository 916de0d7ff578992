"""The task <-> data contract: what a batch of each task holds. Tasks and data modules both import it.

Every batch is a dict of tensors (plus plain lists where sizes differ). A data module's collate
function builds one of these dicts; a task's steps read only the keys written down here.

Evaluation batches of dense tasks keep each label map at its original size, so images of
different sizes are padded (bottom and right) into one tensor; the batch carries each image's size
before padding and each label map's size, and :func:`unpadded_image` / :func:`unpadded_mask` undo
the padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NotRequired, TypedDict

import torch


class ClassificationBatch(TypedDict):
    """Images with one class each (train, validation, test and predict)."""

    image: torch.Tensor  # float [B, 3, H, W], normalised
    label: NotRequired[torch.Tensor]  # long [B], class indices; absent from unlabelled predict batches
    file: NotRequired[list[str]]  # predict batches only: each image's stored path ("" when it has none)


class SegmentationTrainBatch(TypedDict):
    """Equal training crops with their label maps."""

    image: torch.Tensor  # float [B, 3, h, w], normalised
    mask: torch.Tensor  # long [B, h, w], class indices or ignore_index


class SegmentationEvalBatch(TypedDict):
    """Validation, test and predict images, each label map at its original size (padded into one batch)."""

    image: torch.Tensor  # float [B, 3, H, W]: rescaled images, padded with 0 to the largest in the batch
    image_size: torch.Tensor  # long [B, 2]: each image's (height, width) before padding
    original_size: torch.Tensor  # long [B, 2]: each label map's (height, width), the size scored at
    mask: NotRequired[torch.Tensor]  # long [B, H0, W0]: label maps padded with ignore_index; absent when unlabelled
    name: list[str]  # file names without extension (with their sub-folders under predict_images), or row numbers


class DetectionTarget(TypedDict):
    """The objects of one image, in the pixel coordinates of the image in the batch.

    Training targets hold no crowd regions; evaluation targets keep them (``iscrowd`` 1), to be
    ignored by the COCO evaluation, as torchmetrics' ``MeanAveragePrecision`` takes them.
    """

    boxes: torch.Tensor  # float [N, 4], (x1, y1, x2, y2)
    labels: torch.Tensor  # int64 [N], classes 1..K; 0 is the background class of torchvision's detectors
    masks: NotRequired[torch.Tensor]  # uint8 [N, H, W], one binary mask per object (instance segmentation)
    iscrowd: NotRequired[torch.Tensor]  # int64 [N], 1 for a crowd region (evaluation only)
    area: NotRequired[torch.Tensor]  # float [N], the object's area in pixels as the data gives it, where it does
    image_id: int  # the image's id in its dataset (COCO's image_id, else the row), for scoring


class DetectionBatch(TypedDict):
    """Images of different sizes and their objects, as torchvision's detection models take them."""

    images: list[torch.Tensor]  # float [3, H_i, W_i] each, not padded (the model batches them)
    targets: list[DetectionTarget]  # one per image; empty boxes [0, 4] for an image without objects
    file_names: NotRequired[list[str]]  # each image's file name ("" without a file), for writing predictions


def pad_stack(tensors: Sequence[torch.Tensor], fill: float) -> torch.Tensor:
    """Stack ``[..., H_i, W_i]`` tensors into ``[B, ..., H, W]``, padding bottom and right with ``fill``."""
    height = max(tensor.shape[-2] for tensor in tensors)
    width = max(tensor.shape[-1] for tensor in tensors)
    out = tensors[0].new_full((len(tensors), *tensors[0].shape[:-2], height, width), fill)
    for index, tensor in enumerate(tensors):
        out[index, ..., : tensor.shape[-2], : tensor.shape[-1]] = tensor
    return out


def unpadded_image(batch: SegmentationEvalBatch, index: int) -> torch.Tensor:
    """Image ``index`` of an evaluation batch without its padding: ``[3, h, w]``."""
    height, width = batch["image_size"][index].tolist()
    return batch["image"][index, :, :height, :width]


def unpadded_mask(batch: SegmentationEvalBatch, index: int) -> torch.Tensor:
    """Label map ``index`` of an evaluation batch at its original size: ``[H0, W0]``."""
    height, width = batch["original_size"][index].tolist()
    return batch["mask"][index, :height, :width]
