"""How alike two sets of maps are: rank and linear correlation, top-pixel overlap."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..engine.maps import scale_maps
from ..errors import InputError
from ._maps import MapsLike, map_batch, per_map, pixel_order_ranks

__all__ = [
    "average_ranks",
    "spearman_correlation",
    "pearson_correlation",
    "MapComparison",
    "compare_maps",
]


def average_ranks(values: Tensor) -> Tensor:
    """Ranks along the last dim, 1 for the smallest; tied values share their mean rank.

    Returned in float64 (float32 on MPS), exact for any realistic length.

    >>> average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0])).tolist()
    [4.0, 1.0, 4.0, 2.0, 4.0]
    """
    length = values.shape[-1]
    sorted_values, order = values.sort(dim=-1, stable=True)
    positions = torch.arange(length, device=values.device).expand_as(order)
    differs = sorted_values[..., 1:] != sorted_values[..., :-1]
    edge = torch.ones(*differs.shape[:-1], 1, dtype=torch.bool, device=values.device)
    starts = torch.cat([edge, differs], dim=-1)
    ends = torch.cat([differs, edge], dim=-1)
    # First and last sorted position of each value's tie group, in exact integers.
    first = torch.where(starts, positions, 0).cummax(dim=-1).values
    last = torch.where(ends, positions, length).flip(-1).cummin(dim=-1).values.flip(-1)
    sorted_ranks = (first + last).to(_stat_dtype(values.device)) / 2 + 1
    return torch.empty_like(sorted_ranks).scatter_(-1, order, sorted_ranks)


def _stat_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _correlation(x: Tensor, y: Tensor) -> Tensor:
    """Pearson correlation along the last dim; 0 where either side is constant."""
    x = x - x.mean(-1, keepdim=True)
    y = y - y.mean(-1, keepdim=True)
    scale = (x.square().sum(-1) * y.square().sum(-1)).sqrt()
    value = (x * y).sum(-1) / scale.clamp_min(torch.finfo(scale.dtype).tiny)
    return torch.where(scale > 0, value.clamp(-1, 1), 0.0).float()


def _paired_maps(maps_a: Tensor, maps_b: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(maps_a, Tensor) or not isinstance(maps_b, Tensor):
        raise InputError("both maps must be tensors (..., h, w)")
    if maps_a.shape != maps_b.shape or maps_a.dim() < 2:
        raise InputError(
            f"maps of shape {tuple(maps_a.shape)} and {tuple(maps_b.shape)} cannot be "
            "compared; pass two tensors (..., h, w) of the same shape"
        )
    flats = []
    for side in (maps_a, maps_b):
        if not torch.isfinite(side).all():
            raise InputError("maps contain NaN or Inf values; a map must be finite everywhere")
        flats.append(side.detach().flatten(-2).to(_stat_dtype(side.device)))
    return flats[0], flats[1]


def spearman_correlation(maps_a: Tensor, maps_b: Tensor) -> Tensor:
    """Spearman rank correlation of each pair of maps, over their last two dims.

    Ties get average ranks (as ``scipy.stats.spearmanr``). A constant map has no ranking
    to agree with: its correlation is defined as 0 (scipy gives NaN).

    >>> a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    >>> spearman_correlation(a, torch.tensor([[1.0, 3.0], [2.0, 4.0]]))
    tensor(0.8000)
    """
    flat_a, flat_b = _paired_maps(maps_a, maps_b)
    return _correlation(average_ranks(flat_a), average_ranks(flat_b))


def pearson_correlation(maps_a: Tensor, maps_b: Tensor) -> Tensor:
    """Pearson correlation of each pair of maps over their last two dims (constant: 0)."""
    flat_a, flat_b = _paired_maps(maps_a, maps_b)
    return _correlation(flat_a, flat_b)


@dataclass
class MapComparison:
    """How alike two sets of maps are, one value per map (``(B,)`` or ``(B, T)``).

    Attributes:
        spearman: rank correlation (:func:`spearman_correlation`), in ``[-1, 1]``.
        pearson: linear correlation of the raw values, in ``[-1, 1]``.
        top_overlap: intersection over union of the two maps' top ``top_fraction`` of
            pixels (ties in row-major order), in ``[0, 1]``.
        mean_abs_diff: mean absolute difference after scaling each map to ``[0, 1]``
            (:func:`simexplain.engine.scale_maps`), in ``[0, 1]``.
    """

    spearman: Tensor
    pearson: Tensor
    top_overlap: Tensor
    mean_abs_diff: Tensor


def compare_maps(maps_a: MapsLike, maps_b: MapsLike, *, top_fraction: float = 0.1) -> MapComparison:
    """Rank correlation and simple statistics between two sets of maps of the same shape.

    >>> maps = torch.rand(2, 3, 7, 7)
    >>> same = compare_maps(maps, maps)
    >>> same.spearman.tolist() == [[1.0] * 3] * 2, same.mean_abs_diff.abs().max().item()
    (True, 0.0)
    """
    grid_a, grid_b = map_batch(maps_a, "maps_a"), map_batch(maps_b, "maps_b")
    if grid_a.shape != grid_b.shape:
        raise InputError(
            f"maps_a {tuple(grid_a.shape)} and maps_b {tuple(grid_b.shape)} must have the "
            "same (B, T, h, w) shape"
        )
    if not 0 < top_fraction <= 1:
        raise InputError(f"top_fraction must be in (0, 1], got {top_fraction!r}")
    pixels = grid_a.shape[-2] * grid_a.shape[-1]
    top = max(1, math.ceil(top_fraction * pixels))
    in_top_a = pixel_order_ranks(grid_a.flatten(2)) < top
    in_top_b = pixel_order_ranks(grid_b.flatten(2)) < top
    shared = (in_top_a & in_top_b).sum(-1).float()
    difference = (scale_maps(grid_a) - scale_maps(grid_b)).abs().mean((-2, -1))
    return MapComparison(
        spearman=per_map(spearman_correlation(grid_a, grid_b)),
        pearson=per_map(pearson_correlation(grid_a, grid_b)),
        top_overlap=per_map(shared / (2 * top - shared)),
        mean_abs_diff=per_map(difference.float()),
    )
