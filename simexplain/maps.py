"""Post-processing of raw maps: upsampling to the image and scaling to [0, 1]."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["upsample_maps", "scale_maps"]


def upsample_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly resize maps ``(N, 1, h, w)`` (or ``(N, h, w)``) to ``size = (H, W)``."""
    squeeze = maps.dim() == 3
    if squeeze:
        maps = maps.unsqueeze(1)
    out = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
    return out.squeeze(1) if squeeze else out


def scale_maps(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Scale each map (over its last two dims) to [0, 1].

    Non-negative maps (after ReLU) are divided by their maximum, so zero stays zero;
    maps with negative values are min-max scaled. An all-zero (or constant) map gives
    zeros, never NaN.
    """
    flat = maps.flatten(-2)
    low = flat.amin(dim=-1, keepdim=True).clamp_max(0)
    high = flat.amax(dim=-1, keepdim=True)
    scaled = (flat - low) / (high - low).clamp_min(eps)
    return scaled.reshape(maps.shape)
