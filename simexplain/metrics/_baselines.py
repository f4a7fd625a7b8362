"""What perturbed pixels become in deletion and insertion curves: a blur, the image's
mean, a constant or any tensor."""

from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError

__all__ = ["gaussian_blur", "baseline_images"]


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur with edge replication (any image size)."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma).square())
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    horizontal = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    padded = F.conv2d(padded, horizontal, groups=channels)
    return F.conv2d(padded, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def baseline_images(images: Tensor, baseline: Union[str, float, Tensor], sigma: float) -> Tensor:
    if isinstance(baseline, str):
        if baseline == "blur":
            return gaussian_blur(images, sigma)
        if baseline == "mean":
            return images.mean((-2, -1), keepdim=True).expand_as(images)
        raise InputError(
            f"baseline={baseline!r} is not known; use 'blur', 'mean', a number or a tensor "
            "broadcastable to the images (C, 1, 1), (B, C, H, W), ..."
        )
    try:
        fill = torch.as_tensor(baseline, dtype=images.dtype, device=images.device)
        return fill.expand_as(images)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(
            f"baseline of shape {tuple(getattr(baseline, 'shape', ()))} does not broadcast to "
            f"images of shape {tuple(images.shape)}"
        ) from None
