"""Map-guided cropping: zooming each training image into where its map is high.

WS-DAN (Hu et al. 2019) crops each image to the box around its attention map's high
region, resizes the crop to the input size and trains on it as well; here the attention
is the image's similarity map. The control that makes the maps earn any gain is a crop
of the same size at a random place (:func:`random_boxes`).

Boxes are ``(N, 4)`` rows ``(top, left, bottom, right)`` as fractions of the image's
height and width, in [0, 1].
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..engine.engine import SimilarityEngine
from ..engine.layouts import FeatureLayer
from ..engine.maps import image_maps, scale_maps
from ..errors import InputError
from .occurrence_maps import occurrence_maps

__all__ = ["CROP_MODES", "map_boxes", "random_boxes", "crop_and_resize", "map_crops",
           "check_crop_threshold"]

#: What the maps do in training besides the paper's masking (SAMLoss's ``augmentation``).
CROP_MODES = ("crop", "random_crop")


def map_boxes(maps: Tensor, image_hw: Sequence[int], threshold: float = 0.5) -> Tensor:
    """The box ``(N, 4)`` around the pixels where each map, upsampled to ``image_hw`` and
    divided by its maximum, is at least ``threshold``; the whole image where a map is
    all zero.

    Example:
        >>> import torch
        >>> maps = torch.zeros(1, 4, 4)
        >>> maps[0, 1, 2] = 1.0
        >>> map_boxes(maps, (8, 8), threshold=0.9)  # the peak's 2 x 2 pixels at 8 x 8
        tensor([[0.2500, 0.5000, 0.5000, 0.7500]])
    """
    check_crop_threshold(threshold)
    height, width = int(image_hw[0]), int(image_hw[1])
    scaled = image_maps(maps.detach(), (height, width))
    high = scaled >= threshold  # none for an all-zero map, as the threshold is > 0
    high[~high.flatten(1).any(1)] = True
    rows, cols = high.any(2), high.any(1)
    top, bottom = _first(rows), height - _first(rows.flip(1))
    left, right = _first(cols), width - _first(cols.flip(1))
    return torch.stack([top / height, left / width, bottom / height, right / width], 1).float()


def _first(flags: Tensor) -> Tensor:
    return flags.float().argmax(1).float()


def random_boxes(boxes: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Boxes of the same sizes as ``boxes``, each at a uniformly random place inside the
    image."""
    sizes = boxes[:, 2:] - boxes[:, :2]
    draw = torch.rand(sizes.shape, generator=generator, device="cpu").to(boxes.device)
    start = draw * (1 - sizes)
    return torch.cat([start, start + sizes], 1)


def crop_and_resize(images: Tensor, boxes: Tensor, size: Optional[Sequence[int]] = None
                    ) -> Tensor:
    """Each image's box, resized bilinearly to ``size`` (default: the images' size);
    differentiable in the images.

    Example:
        >>> import torch
        >>> images = torch.arange(16.0).reshape(1, 1, 4, 4)
        >>> crop_and_resize(images, torch.tensor([[0.0, 0.0, 0.5, 0.5]]), (2, 2))
        tensor([[[[0., 1.],
                  [4., 5.]]]])
    """
    if images.dim() != 4 or boxes.shape != (images.shape[0], 4):
        raise InputError(
            f"crop_and_resize needs images (N, C, H, W) and boxes (N, 4); got images "
            f"{tuple(images.shape)} and boxes {tuple(boxes.shape)}"
        )
    height, width = (images.shape[-2], images.shape[-1]) if size is None else size
    boxes = boxes.to(images.device, torch.float32)
    theta = torch.zeros(images.shape[0], 2, 3, device=images.device)
    theta[:, 0, 0] = boxes[:, 3] - boxes[:, 1]
    theta[:, 1, 1] = boxes[:, 2] - boxes[:, 0]
    theta[:, 0, 2] = boxes[:, 1] + boxes[:, 3] - 1
    theta[:, 1, 2] = boxes[:, 0] + boxes[:, 2] - 1
    grid = F.affine_grid(theta, [images.shape[0], images.shape[1], int(height), int(width)],
                         align_corners=False)
    return F.grid_sample(images, grid.to(images.dtype), mode="bilinear",
                         padding_mode="border", align_corners=False)


def map_crops(
    engine: SimilarityEngine, activation: Tensor, layer: FeatureLayer, units: Tensor,
    vectors: Tensor, images: Tensor, occurrences: Tensor, relu: bool, threshold: float,
    at_random: bool = False,
) -> tuple[Tensor, Tensor]:
    """Every image cropped around its map and resized to its size, and the boxes.

    The maps are those of the mined tuples' occurrences (``occurrences``, ``units`` and
    ``vectors`` as for :func:`~simexplain.training.occurrence_maps.occurrence_maps`),
    computed without a graph; an image in several tuples is cropped around the mean of
    its maps, each scaled to [0, 1]; an image in none is kept whole. ``at_random``:
    boxes of the same sizes at random places instead (the control).
    """
    maps = occurrence_maps(engine, activation, units, layer, occurrences, vectors,
                           images.shape[-2:], relu, create_graph=False)
    scaled = scale_maps(maps.float())
    sums = scaled.new_zeros(images.shape[0], *scaled.shape[1:]).index_add_(0, occurrences, scaled)
    counts = torch.bincount(occurrences, minlength=images.shape[0]).clamp_min(1)
    boxes = map_boxes(sums / counts[:, None, None], images.shape[-2:], threshold)
    if at_random:
        boxes = random_boxes(boxes)
    return crop_and_resize(images, boxes), boxes


def check_crop_threshold(threshold: Any) -> None:
    """Raise :class:`~simexplain.errors.InputError` unless ``threshold`` is in (0, 1]."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (
        0 < threshold <= 1 and math.isfinite(threshold)
    ):
        raise InputError(
            f"crop_threshold must be in (0, 1] (the fraction of its maximum a map must "
            f"reach inside the crop's box), got {threshold!r}"
        )
