"""Maps: GradCAM's combination of a layer's activations and gradients, and post-processing.

Raw maps live at the layer's resolution; :func:`image_maps` upsamples them to the
images (bilinear) and scales each to [0, 1], the form figures, masks and cues use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gradcam_maps", "upsample_maps", "scale_maps", "image_maps", "full_precision"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def full_precision(tensor: Tensor) -> Tensor:
    """``tensor`` in float32 when it is float16 or bfloat16, else itself: scores, norms
    and maps are computed there (float16's smallest normal is 6e-5, so a quadruplet's
    product of three small factors, or an ``eps`` of 1e-12, would round to zero)."""
    return tensor.float() if tensor.dtype in _LOW_PRECISION else tensor


def gradcam_maps(features: Tensor, gradients: Tensor, relu: bool = True) -> Tensor:
    """GradCAM's combination: the channels of ``features`` ``(N, C, h, w)`` weighted by the
    spatial mean of ``gradients`` (same shape) and summed, ``(N, h, w)``; ReLU'd by default.

    >>> features = torch.ones(1, 2, 2, 2)
    >>> gradients = torch.tensor([1.0, -3.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
    >>> gradcam_maps(features, gradients, relu=False)
    tensor([[[-2., -2.],
             [-2., -2.]]])
    """
    features, gradients = full_precision(features), full_precision(gradients)
    channel_weights = gradients.mean(dim=(2, 3), keepdim=True)
    maps = (channel_weights * features).sum(dim=1)
    return torch.relu(maps) if relu else maps


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
    zeros, never NaN, in every dtype (float16 and bfloat16 maps are scaled in float32).

    >>> scale_maps(torch.zeros(1, 2, 2, dtype=torch.float16))
    tensor([[[0., 0.],
             [0., 0.]]], dtype=torch.float16)
    """
    flat = full_precision(maps.flatten(-2))
    low = flat.amin(dim=-1, keepdim=True).clamp_max(0)
    high = flat.amax(dim=-1, keepdim=True)
    scaled = (flat - low) / (high - low).clamp_min(eps)
    return scaled.to(maps.dtype).reshape(maps.shape)


def image_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Raw maps ``(..., h, w)`` upsampled to ``size = (H, W)`` and scaled to [0, 1] each.

    >>> image_maps(torch.rand(2, 3, 4, 4), (16, 16)).shape
    torch.Size([2, 3, 16, 16])
    """
    size = (int(size[0]), int(size[1]))
    flat = maps.reshape(-1, *maps.shape[-2:])
    return scale_maps(upsample_maps(flat, size)).reshape(*maps.shape[:-2], *size)
