"""Joint image and label-map transforms for semantic segmentation, on ``torchvision.transforms.v2``.

The image travels as a ``tv_tensors.Image`` and the label map as a ``tv_tensors.Mask`` through the
same geometric transforms; torchvision resizes masks with nearest-neighbour only, and photometric
transforms and normalisation leave them alone.

Train (mmsegmentation's ADE20K pipeline): :class:`RandomRescale` of ``scale`` by a ratio drawn from
``ratio_range``, :class:`RandomCategoryCrop` of ``crop_size`` (no class may cover more than
``cat_max_ratio`` of the crop, 10 tries), horizontal flip, :class:`PhotometricDistortion`,
normalisation, then :class:`PadTo` ``crop_size`` (image with 0, mask with ``ignore_index``).
Eval: the image is rescaled to fit ``scale`` (keeping its aspect ratio) and normalised; the mask is
not transformed, so predictions are scored at the original resolution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

Size = tuple[int, int]


def as_size(value: int | Sequence[int], argument: str) -> Size:
    """``(height, width)`` from an int (a square) or a pair; raises naming ``argument`` otherwise."""
    if isinstance(value, int):
        value = (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2 or min(value) < 1:
        raise ValueError(f"{argument}={value} must be a positive int or a (height, width) pair of them.")
    return value  # type: ignore[return-value]


def rescale_size(height: int, width: int, scale: Sequence[float]) -> Size:
    """The largest ``(height, width)`` of the same aspect ratio whose long side fits ``max(scale)``
    and short side fits ``min(scale)`` (mmcv's keep-ratio rescale)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


class RandomRescale(v2.Transform):
    """Rescale (keeping the aspect ratio) to fit ``scale`` times a ratio drawn from ``ratio_range``."""

    def __init__(self, scale: Sequence[int], ratio_range: Sequence[float] = (0.5, 2.0)) -> None:
        super().__init__()
        self.scale = tuple(scale)
        self.ratio_range = tuple(ratio_range)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        low, high = self.ratio_range
        ratio = low + (high - low) * torch.rand(()).item()
        height, width = v2.query_size(flat_inputs)
        return {"size": list(rescale_size(height, width, [int(side * ratio) for side in self.scale]))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(
            F.resize, inpt, params["size"], interpolation=v2.InterpolationMode.BILINEAR, antialias=True
        )


class Rescale(RandomRescale):
    """Rescale (keeping the aspect ratio) to fit ``scale``: the eval resize."""

    def __init__(self, scale: Sequence[int]) -> None:
        super().__init__(scale, ratio_range=(1.0, 1.0))


class RandomCategoryCrop(v2.Transform):
    """Random crop of ``size`` (smaller where the image is) in which no single class covers more than
    ``cat_max_ratio`` of the labelled pixels; up to 10 draws, as mmsegmentation's ``RandomCrop``."""

    attempts = 10

    def __init__(self, size: int | Sequence[int], cat_max_ratio: float = 1.0, ignore_index: int = 255) -> None:
        super().__init__()
        self.size = as_size(size, "crop_size")
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        crop_height, crop_width = min(self.size[0], height), min(self.size[1], width)
        masks = [inpt for inpt in flat_inputs if isinstance(inpt, tv_tensors.Mask)]

        def draw() -> dict[str, int]:
            top = int(torch.randint(0, height - crop_height + 1, ()).item())
            left = int(torch.randint(0, width - crop_width + 1, ()).item())
            return {"top": top, "left": left, "height": crop_height, "width": crop_width}

        params = draw()
        if self.cat_max_ratio >= 1.0 or not masks:
            return params
        for _ in range(self.attempts):
            window = masks[0][
                ..., params["top"] : params["top"] + crop_height, params["left"] : params["left"] + crop_width
            ]
            _, counts = torch.unique(window[window != self.ignore_index], return_counts=True)
            if len(counts) > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio:
                break
            params = draw()
        return params

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


class PhotometricDistortion(v2.Transform):
    """mmsegmentation's photometric distortion on a float image in [0, 1]; each step with probability 0.5.

    Brightness shift of up to ``brightness_delta``/255, contrast scaling by a factor in
    ``contrast_range`` (before or after the colour steps, at random), saturation by a factor in
    ``saturation_range`` and a hue rotation of up to ``hue_delta`` of OpenCV's 180 hue steps.
    Saturation and hue use torchvision's operations.
    """

    _transformed_types = (tv_tensors.Image,)

    def __init__(
        self,
        brightness_delta: float = 32.0,
        contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5),
        hue_delta: float = 18.0,
    ) -> None:
        super().__init__()
        self.brightness_delta = brightness_delta
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)
        self.hue_delta = hue_delta

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        def maybe(low: float, high: float) -> float | None:
            applied = torch.rand(()).item() < 0.5
            value = low + (high - low) * torch.rand(()).item()
            return value if applied else None

        return {
            "brightness": maybe(-self.brightness_delta / 255.0, self.brightness_delta / 255.0),
            "contrast_first": torch.rand(()).item() < 0.5,
            "contrast": maybe(*self.contrast_range),
            "saturation": maybe(*self.saturation_range),
            "hue": maybe(-self.hue_delta / 180.0, self.hue_delta / 180.0),
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        image = inpt.as_subclass(torch.Tensor)
        if params["brightness"] is not None:
            image = (image + params["brightness"]).clamp(0.0, 1.0)
        if params["contrast_first"] and params["contrast"] is not None:
            image = (image * params["contrast"]).clamp(0.0, 1.0)
        if params["saturation"] is not None:
            image = F.adjust_saturation(image, params["saturation"])
        if params["hue"] is not None:
            image = F.adjust_hue(image, params["hue"])
        if not params["contrast_first"] and params["contrast"] is not None:
            image = (image * params["contrast"]).clamp(0.0, 1.0)
        return tv_tensors.wrap(image, like=inpt)


class PadTo(v2.Transform):
    """Pad bottom and right up to ``size``: images with ``fill``, masks with ``ignore_index``."""

    def __init__(self, size: int | Sequence[int], fill: float = 0.0, ignore_index: int = 255) -> None:
        super().__init__()
        self.size = as_size(size, "crop_size")
        self.fill = fill
        self.ignore_index = ignore_index

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        return {"padding": [0, 0, max(self.size[1] - width, 0), max(self.size[0] - height, 0)]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not any(params["padding"]):
            return inpt
        fill = self.ignore_index if isinstance(inpt, tv_tensors.Mask) else self.fill
        return self._call_kernel(F.pad, inpt, params["padding"], fill=fill)


class SegmentationTransform:
    """Apply a joint transform to ``(image, mask)``; return ``(float [3, h, w], long [h, w] or None)``."""

    def __init__(self, transform: Callable[..., Any], joint: bool) -> None:
        self.transform = transform
        self.joint = joint

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        image = tv_tensors.Image(image)
        if self.joint and mask is not None:
            image, mask = self.transform(image, tv_tensors.Mask(mask))
        else:
            image = self.transform(image)
        image = image.as_subclass(torch.Tensor)
        return image, None if mask is None else mask.as_subclass(torch.Tensor).long()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"


def create_segmentation_transforms(
    training: bool = False,
    *,
    crop_size: int | Sequence[int] = 512,
    scale: Sequence[int] = (2048, 512),
    ratio_range: Sequence[float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    hflip: float = 0.5,
    photometric_distortion: bool = True,
    ignore_index: int = 255,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> SegmentationTransform:
    """The train (``training=True``) or eval transform of the module docstring.

    Both take a uint8 image tensor ``[3, H, W]`` and a label map ``[H, W]`` (eval: optional and
    returned as is).
    """
    if not 0.0 < cat_max_ratio <= 1.0:
        raise ValueError(f"cat_max_ratio={cat_max_ratio} must be in (0, 1] (1 disables the limit).")
    if len(scale) != 2 or min(scale) < 1:
        raise ValueError(f"scale={list(scale)} must be two positive sides, e.g. (2048, 512).")
    if len(ratio_range) != 2 or not 0 < ratio_range[0] <= ratio_range[1]:
        raise ValueError(f"ratio_range={list(ratio_range)} must be (low, high) with 0 < low <= high.")
    to_float = v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)
    normalize = v2.Normalize(mean=list(mean), std=list(std))
    if not training:
        return SegmentationTransform(v2.Compose([Rescale(scale), to_float, normalize]), joint=False)
    steps: list[v2.Transform] = [
        to_float,
        RandomRescale(scale, ratio_range),
        RandomCategoryCrop(crop_size, cat_max_ratio, ignore_index),
    ]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(p=hflip))
    if photometric_distortion:
        steps.append(PhotometricDistortion())
    steps += [normalize, PadTo(crop_size, fill=0.0, ignore_index=ignore_index)]
    return SegmentationTransform(v2.Compose(steps), joint=True)
