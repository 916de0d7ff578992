"""Segmentation inference: whole image, sliding window, and multi-scale + flip test-time augmentation.

Each function takes `model`, any callable mapping images `[B, 3, h, w]` to logits
`[B, K, h, w]` at the input size (such as `UperNetSegmentor`), and follows mmsegmentation's
`whole_inference`, `slide_inference` and `SegTTAModel`.
"""

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .upernet import resize

__all__ = ["whole_inference", "slide_inference", "segment"]

Model = Callable[[torch.Tensor], torch.Tensor]
INFERENCE_MODES = ("whole", "slide")


def whole_inference(model: Model, images: torch.Tensor) -> torch.Tensor:
    """Logits of the whole image at once."""
    return resize(model(images), images.shape[-2:])


def slide_inference(
    model: Model,
    images: torch.Tensor,
    crop_size: Sequence[int] = (512, 512),
    stride: Sequence[int] = (341, 341),
) -> torch.Tensor:
    """Logits from overlapping `crop_size` windows `stride` apart, averaged where they overlap.

    The windows cover the image; the last window of a row or column is moved back to end at the
    image border, and an image smaller than a window is one (smaller) window.
    """
    crop_height, crop_width = crop_size
    stride_height, stride_width = stride
    if min(crop_height, crop_width, stride_height, stride_width) < 1:
        raise ValueError(f"crop_size={list(crop_size)} and stride={list(stride)} must be positive.")
    batch, _, height, width = images.shape
    rows = max(height - crop_height + stride_height - 1, 0) // stride_height + 1
    columns = max(width - crop_width + stride_width - 1, 0) // stride_width + 1
    logits = None
    counts = images.new_zeros((1, 1, height, width))
    for row in range(rows):
        for column in range(columns):
            bottom = min(row * stride_height + crop_height, height)
            right = min(column * stride_width + crop_width, width)
            top, left = max(bottom - crop_height, 0), max(right - crop_width, 0)
            window = whole_inference(model, images[:, :, top:bottom, left:right])
            if logits is None:
                logits = window.new_zeros((batch, window.shape[1], height, width))
            logits[:, :, top:bottom, left:right] += window
            counts[:, :, top:bottom, left:right] += 1
    return logits / counts


def _logits(
    model: Model,
    images: torch.Tensor,
    mode: str,
    crop_size: Sequence[int],
    stride: Sequence[int],
) -> torch.Tensor:
    if mode == "whole":
        return whole_inference(model, images)
    if mode == "slide":
        return slide_inference(model, images, crop_size, stride)
    raise ValueError(f"inference mode '{mode}' is not one of {list(INFERENCE_MODES)}.")


def segment(
    model: Model,
    images: torch.Tensor,
    output_size: tuple[int, int],
    mode: str = "whole",
    crop_size: Sequence[int] = (512, 512),
    stride: Sequence[int] = (341, 341),
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> torch.Tensor:
    """Log-probabilities `[B, K, *output_size]`: the prediction scored against labels of `output_size`.

    Without test-time augmentation (one scale of 1.0, no flip) the logits are resized to
    `output_size` (bilinear) before the log-softmax, as mmsegmentation resizes logits to the
    original image. With it, `images` is also rescaled by each of `scales` (and flipped
    horizontally when `flip`); the softmax of each view's logits, resized to `output_size` (and
    flipped back), is averaged over the views.
    """
    scales = list(scales)
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales={scales} must be positive ratios, e.g. [0.5, 0.75, 1.0, 1.25, 1.5, 1.75].")
    if scales == [1.0] and not flip:
        logits = _logits(model, images, mode, crop_size, stride)
        return F.log_softmax(resize(logits.float(), output_size), dim=1)
    height, width = images.shape[-2:]
    probabilities = None
    views = 0
    for scale in scales:
        size = (int(height * scale + 0.5), int(width * scale + 0.5))
        scaled = resize(images, size)
        for flipped in (False, True) if flip else (False,):
            view = scaled.flip(-1) if flipped else scaled
            logits = resize(_logits(model, view, mode, crop_size, stride).float(), output_size)
            if flipped:
                logits = logits.flip(-1)
            view_probabilities = logits.softmax(dim=1)
            probabilities = view_probabilities if probabilities is None else probabilities + view_probabilities
            views += 1
    return (probabilities / views).clamp_min(torch.finfo(probabilities.dtype).tiny).log()
