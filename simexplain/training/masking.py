"""Soft masks: erasing each image where its map is high, differentiably."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..engine.maps import image_maps
from ..errors import InputError

__all__ = ["soft_mask", "kept_fraction", "check_mask_parameters"]


def soft_mask(images: Tensor, maps: Tensor, alpha: float = 10.0, beta: float = 0.5) -> Tensor:
    """Erase each image softly where its map is high: ``x * (1 - sigmoid(alpha (M - beta)))``.

    Args:
        images: ``(N, C, H, W)``.
        maps: ``(N, 1, h, w)`` or ``(N, h, w)`` at any resolution; they are upsampled
            to the images and scaled to [0, 1] (divided by their maximum) first.
        alpha: steepness of the mask (> 0); large values approach a hard threshold.
        beta: the map value (in [0, 1]) at which half of the pixel is erased.

    Example:
        >>> import torch
        >>> images = torch.ones(1, 3, 4, 4)
        >>> maps = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
        >>> masked = soft_mask(images, maps, alpha=50)
        >>> round(float(masked[0, 0, 0, 3]), 3), round(float(masked[0, 0, 3, 0]), 3)
        (0.0, 1.0)
    """
    check_mask_parameters(alpha, beta)
    if maps.dim() == 4:
        if maps.shape[1] != 1:
            raise InputError(f"maps must have one channel, got shape {tuple(maps.shape)}")
        maps = maps[:, 0]
    if maps.dim() != 3 or images.dim() != 4 or maps.shape[0] != images.shape[0]:
        raise InputError(
            f"soft_mask needs images (N, C, H, W) and one map per image, (N, h, w) or "
            f"(N, 1, h, w); got images {tuple(images.shape)} and maps {tuple(maps.shape)}"
        )
    keep = kept_fraction(maps, (images.shape[-2], images.shape[-1]), alpha, beta)
    return images * keep.unsqueeze(1).to(images.dtype)


def kept_fraction(maps: Tensor, size: tuple[int, int], alpha: float, beta: float) -> Tensor:
    """What :func:`soft_mask` keeps of each pixel, ``(N, H, W)`` in (0, 1): maps ``(N, h, w)``
    upsampled to ``size``, scaled to [0, 1], through ``1 - sigmoid(alpha (M - beta))``."""
    return 1 - torch.sigmoid(alpha * (image_maps(maps, size) - beta))


def check_mask_parameters(alpha: Any, beta: Any) -> None:
    """Raise :class:`~simexplain.errors.InputError` unless ``alpha > 0``, ``beta`` in [0, 1]."""
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise InputError(f"alpha must be a finite number > 0 (the mask's steepness), got {alpha!r}")
    if not isinstance(beta, (int, float)) or not 0 <= beta <= 1:
        raise InputError(
            f"beta must be in [0, 1] (the map value where the mask erases half), got {beta!r}"
        )
