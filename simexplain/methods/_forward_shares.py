"""Gradient times activation of every embedding coordinate, one location at a time.

``R[:, p] = J (A * 1_p)``: the head's Jacobian applied to the layer's output kept at
location ``p`` only, a forward-mode derivative (a Jacobian-vector product). A grid of
``P`` locations takes ``P`` of them, against one backward pass per embedding coordinate
the other way round, and gives every coordinate exactly: for a CNN's 7 x 7 grid and a
1280-d embedding, 49 passes instead of 1280 (or a random projection's error). Not every
operation has a forward-mode derivative (CPU attention kernels among them): the caller
then falls back to backward passes.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["cell_masks", "forward_shares"]

#: Elements of head inputs held at once (copies per block x their size).
_BUDGET = 1 << 24


def cell_masks(spatial: Callable[[Tensor], Tensor], sample: Tensor) -> Tensor:
    """``(h * w, *sample.shape[1:])``: for each cell of the layer's grid, row by row, the
    0/1 mask of the layer output's elements (in its own layout, e.g. tokens with a
    class token) that ``spatial`` (layout -> ``(N, C, h, w)``) reads into that cell."""
    probe = torch.zeros_like(sample[:1], dtype=torch.float32).requires_grad_()
    with torch.enable_grad():
        grid = spatial(probe)
        h, w = grid.shape[-2:]
        masks = []
        for cell in range(h * w):
            row, col = divmod(cell, w)
            mask, = torch.autograd.grad(grid[0, :, row, col].sum(), probe, retain_graph=True)
            masks.append((mask[0] != 0).to(sample.dtype))
    return torch.stack(masks)


def forward_shares(head: Callable[[Tensor, int], Tensor], activation: Tensor,
                   masks: Tensor) -> Tensor:
    """``(N, d, cells)``: ``R[:, p]`` for every cell ``p`` of ``masks`` (:func:`cell_masks`)
    and image of ``activation`` ``(N, ...)``; ``head(x, copies)`` maps ``copies`` copies of
    the images' layer output, copy-major ``(copies * N, ...)``, to their embeddings."""
    count = activation.shape[0]
    block = max(1, _BUDGET // max(1, activation.numel() * 2))
    found = []
    with torch.no_grad():
        for start in range(0, masks.shape[0], block):
            cells = masks[start:start + block]
            copies = cells.shape[0]
            tangent = (activation[None] * cells[:, None]).reshape(-1, *activation.shape[1:])
            base = activation.repeat(copies, *([1] * (activation.dim() - 1)))
            _, change = torch.func.jvp(lambda x, n=copies: head(x, n), (base,), (tangent,))
            found.append(change.reshape(copies, count, -1))
    return torch.cat(found).permute(1, 2, 0).float()
