"""Maps as the metrics take them, read into one ``(B, T, h, w)`` tensor, and the order in
which a map ranks its pixels (ties broken in raster order or at random)."""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

from ..engine.maps import upsample_maps
from ..errors import InputError

__all__ = [
    "MapsLike", "map_batch", "per_map", "at_size", "pixel_order_ranks", "split_ties",
    "random_tie_ranks",
]

#: Maps as a tensor ``(B, T, h, w)``, ``(B, 1, h, w)`` or ``(B, h, w)``, or a sequence of
#: ``T`` tensors ``(B, 1, h, w)`` (the output of ``EmbeddingAttribution.attribute``).
MapsLike = Union[Tensor, Sequence[Tensor]]


def map_batch(maps: MapsLike, name: str = "maps") -> Tensor:
    """Maps as one float tensor ``(B, T, h, w)``."""
    if isinstance(maps, (tuple, list)):
        if not maps:
            raise InputError(f"{name} is an empty sequence; pass one map tensor per slot")
        parts = [map_batch(m, f"{name}[{i}]") for i, m in enumerate(maps)]
        for i, part in enumerate(parts):
            if part.shape[1] != 1 or part.shape != parts[0].shape:
                raise InputError(
                    f"{name}[{i}] has shape {tuple(part.shape)}; a sequence of maps must hold "
                    f"one (B, 1, h, w) tensor per slot, all of shape {tuple(parts[0].shape)}"
                )
        return torch.cat(parts, dim=1)
    if not isinstance(maps, Tensor):
        raise InputError(f"{name} is {type(maps).__name__}; expected a tensor (B, T, h, w)")
    if maps.dim() == 3:
        maps = maps.unsqueeze(1)
    if maps.dim() != 4:
        raise InputError(
            f"{name} has shape {tuple(maps.shape)}; expected (B, h, w), (B, 1, h, w) or "
            "(B, T, h, w) with one map per slot"
        )
    if 0 in maps.shape:
        raise InputError(f"{name} has shape {tuple(maps.shape)}; it holds no map values")
    if maps.dtype not in (torch.float32, torch.float64):
        maps = maps.float()
    if not torch.isfinite(maps).all():
        raise InputError(f"{name} contains NaN or Inf values; a map must be finite everywhere")
    return maps.detach()


def per_map(values: Tensor) -> Tensor:
    """``(B, T)`` values as ``(B,)`` when there is one slot."""
    return values.squeeze(1) if values.shape[1] == 1 else values


def at_size(maps: Tensor, size: Sequence[int]) -> Tensor:
    return maps if tuple(maps.shape[-2:]) == tuple(size) else upsample_maps(maps, tuple(size))


def pixel_order_ranks(flat_maps: Tensor) -> Tensor:
    """Rank of each value along the last dim, highest first; ties: lower index first."""
    order = flat_maps.sort(dim=-1, descending=True, stable=True).indices
    positions = torch.arange(flat_maps.shape[-1], device=flat_maps.device)
    return torch.empty_like(order).scatter_(-1, order, positions.expand_as(order).contiguous())


def split_ties(flat_maps: Tensor, counts: Tensor) -> Tensor:
    """``(S + 1, B)``: whether step ``s`` of map ``b`` depends on how ties are ordered.

    It does when a group of equal values straddles the step's pixel count: the top
    ``counts[s]`` pixels are then not determined by the values alone.
    """
    if flat_maps.shape[-1] < 2:
        return torch.zeros(
            counts.numel(), flat_maps.shape[0], dtype=torch.bool, device=flat_maps.device
        )
    ordered = flat_maps.sort(dim=-1, descending=True).values
    inner = (counts > 0) & (counts < flat_maps.shape[-1])
    cut = counts.clamp(1, flat_maps.shape[-1] - 1)
    split = ordered[:, cut - 1] == ordered[:, cut]  # (B, S + 1)
    return (split & inner).t()


def random_tie_ranks(flat_maps: Tensor, generator: torch.Generator) -> Tensor:
    """Ranks of ``(B, P)`` values, highest first, ties in a random order.

    A stable sort by value of the pixels shuffled by random keys: pixels sort by
    (value descending, key), so only tied pixels are reordered. The keys are drawn on
    the CPU from ``generator`` (the same on every device), in float64 so that equal keys
    are practically impossible.
    """
    keys = torch.rand(flat_maps.shape, generator=generator, dtype=torch.float64)
    shuffle = keys.to(flat_maps.device).argsort(dim=-1)
    shuffled = flat_maps.gather(-1, shuffle)
    order = shuffle.gather(-1, shuffled.sort(dim=-1, descending=True, stable=True).indices)
    positions = torch.arange(flat_maps.shape[-1], device=flat_maps.device)
    return torch.empty_like(order).scatter_(-1, order, positions.expand_as(order).contiguous())
