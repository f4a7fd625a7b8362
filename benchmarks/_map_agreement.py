"""How much two methods' maps agree: Spearman rank correlation and IoU of the top cells,
at one common grid (``bench_blackbox.py``)."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from discriminative import correlation
from similar_pairs import upsampled

#: The share of a map's cells that makes its top for the IoU.
TOP = 0.2


def on_grid(maps: Tensor, size: int, grid: int) -> Tensor:
    """Maps ``(B, h, w)`` at the image's size, averaged over ``grid x grid`` cells,
    ``(B, grid * grid)``: one resolution for every method."""
    return nn.functional.adaptive_avg_pool2d(upsampled(maps, size), grid).flatten(1)


def ranks(x: Tensor) -> Tensor:
    """Each row's ranks, 1 to n, ties given their mean rank."""
    below = (x[:, None, :] < x[:, :, None]).sum(-1)
    level = (x[:, None, :] == x[:, :, None]).sum(-1)
    return below + (level + 1) / 2


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of each pair of rows."""
    return correlation(ranks(a), ranks(b))


def top_iou(a: Tensor, b: Tensor, share: float = TOP) -> Tensor:
    """IoU of the top ``share`` of each pair of rows (ties broken by position)."""
    count = max(1, round(share * a.shape[1]))

    def top(x: Tensor) -> Tensor:
        order = torch.sort(x, dim=1, descending=True, stable=True).indices[:, :count]
        return torch.zeros_like(x, dtype=torch.bool).scatter_(1, order, True)

    first, second = top(a), top(b)
    return (first & second).sum(1) / (first | second).sum(1)


def agreements(maps: dict[str, Tensor], size: int, grid: int) -> dict[str, dict]:
    """Spearman and top-IoU of every two methods' maps (the scene's, every pair)."""
    cells = {name: on_grid(m, size, grid) for name, m in maps.items()}
    out = {}
    for first, second in itertools.combinations(cells, 2):
        rho = spearman(cells[first], cells[second])
        iou = top_iou(cells[first], cells[second])
        out[f"{first} ~ {second}"] = {"spearman_median": rho.median().item(),
                                      "spearman_mean": rho.mean().item(),
                                      "top_iou_mean": iou.mean().item()}
    return out
