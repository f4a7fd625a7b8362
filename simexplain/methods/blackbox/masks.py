"""Where each perturbation of a black-box method hides an image: its keep masks.

A perturbation is a keep mask ``m`` with values in [0, 1] over the image's pixels; the
perturbed image is ``m * x + (1 - m) * fill``. A mask set makes its masks a batch at a
time, from a description small enough to hold whole (window positions, or RISE's
low-resolution grids and shifts), so memory stays bounded by one batch of full-size masks.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import InputError

__all__ = ["MaskSet", "SlidingWindows", "RandomMasks", "size_pair"]

Size = tuple[int, int]


class MaskSet(Protocol):
    """What the perturbation runner reads from a mask set."""

    #: The number of masks: forward passes per explained image.
    count: int

    def batch(self, start: int, stop: int, device: torch.device) -> Tensor:
        """Keep masks ``start`` to ``stop - 1``, ``(K, 1, H, W)`` float32 on ``device``."""


def _whole(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def size_pair(value: Any, name: str, what: str = "pixels") -> Size:
    """``value`` as ``(height, width)``: one positive whole number for both, or a pair.

    >>> size_pair(4, "window"), size_pair((2, 3), "stride")
    ((4, 4), (2, 3))
    """
    pair = (value, value) if _whole(value) else value
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(map(_whole, pair))
            and min(pair) >= 1):
        raise InputError(
            f"{name} must be a positive whole number of {what}, or a pair (height, width) "
            f"of them, got {value!r}"
        )
    return int(pair[0]), int(pair[1])


def _starts(side: int, cells: int, window: int) -> Tensor:
    """The first pixel of a window of ``window`` pixels centred on each of ``cells`` equal
    cells spanning ``side`` pixels (it may lie before 0: windows at the border are cut)."""
    centres = (torch.arange(cells, dtype=torch.float64) + 0.5) * side / cells
    return torch.floor(centres - window / 2 + 0.5).long()


class SlidingWindows:
    """Windows of ``window`` pixels, one centred on each cell of a ``grid`` spanning the
    image, ``ceil(side / stride)`` cells per side (so neighbouring windows are at most
    ``stride`` pixels apart, exactly ``stride`` when it divides the side). Mask ``k``
    hides the window on cell ``(k // cols, k % cols)``; windows at the border are cut.

    >>> windows = SlidingWindows((4, 4), window=2, stride=2)
    >>> windows.grid, windows.count
    ((2, 2), 4)
    >>> windows.batch(1, 2, torch.device("cpu"))[0, 0]
    tensor([[1., 1., 0., 0.],
            [1., 1., 0., 0.],
            [1., 1., 1., 1.],
            [1., 1., 1., 1.]])
    """

    def __init__(self, image_size: Size, window: Optional[Any] = None,
                 stride: Optional[Any] = None) -> None:
        height, width = image_size
        if window is None:  # a quarter of the side, the stride half the window
            window = (max(1, round(height / 4)), max(1, round(width / 4)))
        self.window = size_pair(window, "window")
        if stride is None:
            stride = (max(1, round(self.window[0] / 2)), max(1, round(self.window[1] / 2)))
        self.stride = size_pair(stride, "stride")
        for axis, side in enumerate(image_size):
            if self.window[axis] > side or self.stride[axis] > side:
                raise InputError(
                    f"window {self.window} and stride {self.stride} must fit the "
                    f"{height}x{width} images; pass smaller ones (default: a quarter of the "
                    "image side, the stride half the window)"
                )
        self.image_size = (int(height), int(width))
        self.grid = (math.ceil(height / self.stride[0]), math.ceil(width / self.stride[1]))
        self.count = self.grid[0] * self.grid[1]
        self._rows = _starts(height, self.grid[0], self.window[0])
        self._cols = _starts(width, self.grid[1], self.window[1])

    def batch(self, start: int, stop: int, device: torch.device) -> Tensor:
        index = torch.arange(start, stop)
        top, left = self._rows[index // self.grid[1]], self._cols[index % self.grid[1]]
        rows = torch.arange(self.image_size[0])[None, :]
        cols = torch.arange(self.image_size[1])[None, :]
        in_rows = (rows >= top[:, None]) & (rows < top[:, None] + self.window[0])
        in_cols = (cols >= left[:, None]) & (cols < left[:, None] + self.window[1])
        hidden = in_rows[:, :, None] & in_cols[:, None, :]
        return (~hidden).float().unsqueeze(1).to(device)


class RandomMasks:
    """RISE's masks (Petsiuk et al. 2018): a random binary grid, each cell kept with
    probability ``p``, upsampled bilinearly and shifted by a random fraction of a cell.

    Each mask starts as a ``(s_h + 1) x (s_w + 1)`` grid (``grid = (s_h, s_w)``), is
    upsampled so that every cell spans ``ceil(H / s_h) x ceil(W / s_w)`` pixels, and is cut
    to ``H x W`` at a random offset within one cell. The grids and offsets of all masks are
    drawn at once from ``seed`` (a few bytes per mask); the full-size masks are made a batch
    at a time, the same whatever the batch.

    >>> masks = RandomMasks((8, 8), n_masks=3, grid=2, p=0.5, seed=0)
    >>> batch = masks.batch(0, 3, torch.device("cpu"))
    >>> tuple(batch.shape), bool(((batch >= 0) & (batch <= 1)).all())
    ((3, 1, 8, 8), True)
    >>> torch.equal(batch[1:], masks.batch(1, 3, torch.device("cpu")))
    True
    """

    def __init__(self, image_size: Size, n_masks: int, grid: Any, p: float, seed: int) -> None:
        cells = self.check(n_masks, grid, p, seed)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.count = int(n_masks)
        self.cell = tuple(math.ceil(side / n) for side, n in zip(self.image_size, cells))
        generator = torch.Generator().manual_seed(int(seed))
        self._grids = torch.rand(self.count, cells[0] + 1, cells[1] + 1,
                                 generator=generator) < float(p)
        self._shifts = torch.stack(
            [torch.randint(0, c, (self.count,), generator=generator) for c in self.cell], 1)
        self._canvas = tuple((n + 1) * c for n, c in zip(cells, self.cell))

    @staticmethod
    def check(n_masks: Any, grid: Any, p: Any, seed: Any) -> Size:
        """Raise :class:`~simexplain.errors.InputError` for unusable options; the grid's
        ``(s_h, s_w)`` otherwise."""
        if not _whole(n_masks) or n_masks < 1:
            raise InputError(f"n_masks must be a positive whole number, got {n_masks!r}")
        cells = size_pair(grid, "grid", "cells")
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p < 1:
            raise InputError(
                f"p, the probability that a grid cell is kept, must lie strictly between 0 "
                f"and 1, got {p!r}; RISE uses 0.5"
            )
        if not _whole(seed):
            raise InputError(f"seed must be a whole number, got {seed!r}")
        return cells

    def batch(self, start: int, stop: int, device: torch.device) -> Tensor:
        grids = self._grids[start:stop, None].to(device=device, dtype=torch.float32)
        canvas = F.interpolate(grids, size=self._canvas, mode="bilinear", align_corners=False)
        height, width = self.image_size
        return torch.stack([
            canvas[k, :, dy:dy + height, dx:dx + width]
            for k, (dy, dx) in enumerate(self._shifts[start:stop].tolist())
        ])
