"""Built-in image transforms for streaming datasets: torchvision.transforms.v2 pipelines by name.

Contract for transform plugins: a factory registered with ``@register_transform(name)`` takes
``size: int`` (the recipe's ``image_size``, supplied by metriclab) plus options of its own, and returns
a picklable callable (it runs in DataLoader worker processes) that maps one decoded image, a
``uint8 (C, H, W)`` tensor of any size, to a ``uint8 (C, size, size)`` tensor. Normalisation is not a
transform's job: the network standardises its input per channel (see ``docs/components.md``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from metriclab.errors import MetricLabError
from metriclab.registry import register_transform

if TYPE_CHECKING:  # torchvision is imported where a transform is built: importing it takes a second
    from torchvision.transforms import v2


def _check(size: int) -> None:
    if not isinstance(size, int) or size < 1:
        raise MetricLabError(f"transform size must be a positive integer, got {size!r}; pass --image-size")


INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def _mode(interpolation: str) -> v2.InterpolationMode:
    """torchvision's resampling mode named ``interpolation`` (a pretrained timm backbone's, e.g. bicubic)."""
    from torchvision.transforms import v2

    if interpolation not in INTERPOLATIONS:
        raise MetricLabError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    return v2.InterpolationMode(interpolation)


@register_transform("random-resized-crop")
def random_resized_crop(
    size: int = 224,
    scale: tuple[float, float] = (0.2, 1.0),
    flip: bool = True,
    color_jitter: float = 0.0,
    interpolation: str = "bilinear",
) -> v2.Compose:
    """Training augmentation: a random crop of ``scale`` of the area resized to ``size``, horizontal flip, jitter."""
    from torchvision.transforms import v2

    _check(size)
    if not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
        raise MetricLabError(f"random-resized-crop: scale must be [low, high] with 0 < low <= high <= 1, got {scale}")
    steps: list = [v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=_mode(interpolation), antialias=True)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    if color_jitter:
        steps.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter))
    return v2.Compose(steps)


@register_transform("resize-center-crop")
def resize_center_crop(size: int = 224, crop_fraction: float = 0.875, interpolation: str = "bilinear") -> v2.Compose:
    """Test-time view: the shorter side resized to ``size / crop_fraction``, then the central ``size`` square.

    timm's evaluation view (``crop_pct``) when ``crop_fraction`` and ``interpolation`` are a backbone's.
    """
    from torchvision.transforms import v2

    _check(size)
    if not 0 < crop_fraction <= 1:
        raise MetricLabError(f"resize-center-crop: crop_fraction must be in (0, 1], got {crop_fraction}")
    resize = v2.Resize(round(size / crop_fraction), interpolation=_mode(interpolation), antialias=True)
    return v2.Compose([resize, v2.CenterCrop(size)])


@register_transform("resize")
def resize(size: int = 224, interpolation: str = "bilinear") -> v2.Compose:
    """The whole image squeezed to ``size`` x ``size`` (no crop; the aspect ratio changes)."""
    import torch
    from torchvision.transforms import v2

    _check(size)
    return v2.Compose(
        [v2.Resize((size, size), interpolation=_mode(interpolation), antialias=True), v2.ToDtype(torch.uint8)]
    )
