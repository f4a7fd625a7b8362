"""Localisation against ground truth: does the map point at, and hold its mass on, the object?"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..errors import InputError
from ._maps import MapsLike, at_size, map_batch, per_map

__all__ = ["box_masks", "pointing_game", "energy_in_box"]


def box_masks(boxes: Tensor, size: Sequence[int]) -> Tensor:
    """Boolean masks ``(..., H, W)`` of boxes ``(..., 4)`` given as ``x1, y1, x2, y2`` pixels.

    A pixel belongs to a box when its centre ``(col + 0.5, row + 0.5)`` lies in
    ``[x1, x2) x [y1, y2)``, so the integer box ``(0, 0, 2, 1)`` holds pixels
    ``(row 0, col 0)`` and ``(row 0, col 1)``.

    >>> box_masks(torch.tensor([0, 0, 2, 1]), (2, 3)).int()
    tensor([[1, 1, 0],
            [0, 0, 0]], dtype=torch.int32)
    """
    height, width = int(size[0]), int(size[1])
    boxes = boxes.to(torch.float64)
    rows = torch.arange(height, device=boxes.device, dtype=torch.float64) + 0.5
    cols = torch.arange(width, device=boxes.device, dtype=torch.float64) + 0.5
    x1, y1, x2, y2 = (boxes[..., i, None] for i in range(4))
    in_rows = (rows >= y1) & (rows < y2)
    in_cols = (cols >= x1) & (cols < x2)
    return in_rows.unsqueeze(-1) & in_cols.unsqueeze(-2)


def _ground_truth(truth: Tensor, maps: Tensor, image_size: Optional[Sequence[int]]) -> Tensor:
    """Ground truth as bool masks ``(B, T or 1, H, W)`` checked against maps ``(B, T, h, w)``."""
    batch, slots = maps.shape[:2]
    if not isinstance(truth, Tensor):
        raise InputError(
            f"the ground truth is {type(truth).__name__}; pass bool masks (B, H, W) or "
            "boxes (B, 4) as x1, y1, x2, y2 pixels, as tensors"
        )
    if truth.dtype == torch.bool:
        if truth.dim() not in (3, 4):
            raise InputError(
                f"masks have shape {tuple(truth.shape)}; expected (B, H, W) or (B, T, H, W)"
            )
        masks = truth if truth.dim() == 4 else truth.unsqueeze(1)
    elif truth.dim() in (2, 3) and truth.shape[-1] == 4:
        if not torch.isfinite(truth.float()).all():
            raise InputError("boxes contain NaN or Inf values")
        size = maps.shape[-2:] if image_size is None else image_size
        boxes = truth if truth.dim() == 3 else truth.unsqueeze(1)
        masks = box_masks(boxes, size)
    else:
        raise InputError(
            f"the ground truth has shape {tuple(truth.shape)} and dtype {truth.dtype}; pass "
            "bool masks (B, H, W) or (B, T, H, W) (e.g. `mask > 0`), or boxes (B, 4) or "
            "(B, T, 4) as x1, y1, x2, y2 pixels"
        )
    if masks.shape[0] != batch or masks.shape[1] not in (1, slots):
        raise InputError(
            f"the ground truth covers {tuple(masks.shape[:2])} (batch, slots) but the maps "
            f"are {tuple(maps.shape[:2])}; pass one mask or box per map, or one per tuple "
            "(a ground truth that is not bool is read as boxes x1, y1, x2, y2)"
        )
    empty = ~masks.flatten(2).any(-1)
    if empty.any():
        items = empty.nonzero().tolist()[:5]
        raise InputError(
            f"the ground truth of (item, slot) {items} is empty: no pixel lies inside. Boxes "
            "are x1, y1, x2, y2 in pixels of image_size (default: the maps' size) with "
            "x1 < x2 and y1 < y2; pass image_size= when the maps are at layer resolution"
        )
    return masks.to(maps.device)


def pointing_game(
    maps: MapsLike,
    ground_truth: Tensor,
    *,
    tolerance: float = 0.0,
    image_size: Optional[Sequence[int]] = None,
) -> Tensor:
    """Whether each map's maximum falls on the ground truth (the pointing game).

    Maps are upsampled bilinearly to the ground truth's size. The peak is the first
    maximal pixel in row-major order. A constant map (for example all zero) points
    nowhere and counts as a miss.

    Args:
        maps: see :data:`MapsLike`.
        ground_truth: bool masks ``(B, H, W)`` / ``(B, T, H, W)``, or boxes ``(B, 4)`` /
            ``(B, T, 4)`` as ``x1, y1, x2, y2`` pixels (see :func:`box_masks`). One per
            tuple is shared by all slots.
        tolerance: a hit also when the peak is within this many pixels (Euclidean) of a
            ground-truth pixel; 15 at 224 px is the usual choice.
        image_size: ``(H, W)`` the boxes refer to; default the maps' size.

    Returns:
        Bool hits, ``(B,)`` for one map per tuple, ``(B, T)`` otherwise.

    >>> maps = torch.zeros(2, 4, 4)
    >>> maps[0, 0, 0] = maps[1, 3, 3] = 1.0
    >>> pointing_game(maps, torch.tensor([[0, 0, 2, 2], [0, 0, 2, 2]]))
    tensor([ True, False])
    """
    grid = map_batch(maps)
    masks = _ground_truth(ground_truth, grid, image_size)
    grid = at_size(grid, masks.shape[-2:])
    flat = grid.flatten(2)
    peak = flat.argmax(-1)
    width = grid.shape[-1]
    rows = torch.arange(grid.shape[-2], device=grid.device).view(-1, 1)
    cols = torch.arange(width, device=grid.device).view(1, -1)
    row_dist = rows - (peak // width)[..., None, None]
    col_dist = cols - (peak % width)[..., None, None]
    near = row_dist.square() + col_dist.square() <= float(tolerance) ** 2
    hits = (near & masks).flatten(2).any(-1)
    pointing = flat.amax(-1) > flat.amin(-1)
    return per_map(hits & pointing)


def energy_in_box(
    maps: MapsLike, ground_truth: Tensor, *, image_size: Optional[Sequence[int]] = None
) -> Tensor:
    """Fraction of each map's positive mass inside the ground truth (relevance mass).

    Negative values are clipped to zero before summing. A map with no positive value
    (for example all zero) has no mass to place and scores 0.

    Args:
        maps: see :data:`MapsLike`; upsampled bilinearly to the ground truth's size.
        ground_truth: as in :func:`pointing_game`.
        image_size: ``(H, W)`` the boxes refer to; default the maps' size.

    Returns:
        Float fractions in ``[0, 1]``, ``(B,)`` or ``(B, T)``.

    >>> energy_in_box(torch.ones(1, 4, 4), torch.tensor([[0, 0, 2, 2]]))
    tensor([0.2500])
    """
    grid = map_batch(maps)
    masks = _ground_truth(ground_truth, grid, image_size)
    positive = at_size(grid, masks.shape[-2:]).clamp_min(0)
    total = positive.sum((-2, -1))
    inside = (positive * masks).sum((-2, -1))
    return per_map(torch.where(total > 0, inside / total.clamp_min(1e-30), 0.0))
