"""The correspondence benchmark's scoring (which object each top match joins to which),
its baselines' matrices, and its embedding heads on the pretrained features."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from _embedding_heads import train_head

Grid = tuple[int, int]


# --------------------------------------------------------------------------- scoring


def cell_centres(grid: Grid, size: Grid) -> Tensor:
    """``(h * w, 2)`` input-pixel (row, column) centres of a grid's cells, row-major."""
    (h, w), (height, width) = grid, size
    rows = (torch.arange(h, dtype=torch.float64) + 0.5) * height / h
    cols = (torch.arange(w, dtype=torch.float64) + 0.5) * width / w
    return torch.cartesian_prod(rows, cols)


def inside(centres: Tensor, boxes: Tensor) -> Tensor:
    """``(P, K)``: whether centre ``p`` lies in box ``k`` (``x1, y1, x2, y2``, ends
    exclusive, as :func:`simexplain.data.scenes.masks_to_boxes` gives them)."""
    y, x = centres[:, None, 0], centres[:, None, 1]
    b = boxes.double()
    return (x >= b[:, 0]) & (x < b[:, 2]) & (y >= b[:, 1]) & (y < b[:, 3])


def cells_in_boxes(grid: Grid, size: Grid, boxes: Tensor, rule: str = "centre") -> Tensor:
    """``(h * w, K)``: whether each cell is on each box, by ``rule``: ``"centre"``, its
    centre lies inside the box (the point :meth:`Correspondence.matches` gives);
    ``"touch"``, the cell's square overlaps the box (a coarse grid's cells at an object's
    edge hold the object too)."""
    if rule == "centre":
        return inside(cell_centres(grid, size), boxes)
    if rule != "touch":
        raise ValueError(f"rule must be 'centre' or 'touch', got {rule!r}")
    (h, w), (height, width) = grid, size
    top_left = cell_centres(grid, size) - torch.tensor([height / h, width / w]) / 2
    y, x = top_left[:, None, 0], top_left[:, None, 1]
    b = boxes.double()
    return ((x < b[:, 2]) & (x + width / w > b[:, 0])
            & (y < b[:, 3]) & (y + height / h > b[:, 1]))


def kinds_of(first: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
    """For matches whose ends lie in boxes ``first`` ``(n, K)`` (image 1) and ``second``
    ``(n, K)`` (image 2): whether each joins an object to itself, and whether it joins
    one object to another (and not to itself)."""
    joined = first[:, :, None] & second[:, None, :]  # (n, K, K): object o to object o'
    same = torch.diagonal(joined, dim1=1, dim2=2).any(1)
    eye = torch.eye(first.shape[1], dtype=torch.bool)
    other = (joined & ~eye).any((1, 2)) & ~same
    return same, other


def top_entries(matrix: Tensor, n: int) -> Tensor:
    """The flat indices of a matrix's ``n`` largest entries, ties in index order (the
    outer products of non-negative maps hold many zeros)."""
    order = torch.sort(matrix.flatten(), descending=True, stable=True).indices
    return order[:n]


def match_shares(matrix: Tensor, boxes1: Tensor, boxes2: Tensor, grids: Sequence[Grid],
                 sizes: Sequence[Grid], n: int, rule: str = "centre"
                 ) -> tuple[Tensor, Tensor]:
    """The share of each pair's top-``n`` matches that join an object to itself, and to
    the other object: ``(B,)`` each, from matrices ``(B, h1 * w1, h2 * w2)`` and the
    objects' boxes ``(B, K, 4)`` in each image (object ``k`` is the same in both), a
    cell being on a box by ``rule`` (:func:`cells_in_boxes`). A match with an end on no
    box counts in neither."""
    columns = matrix.shape[-1]
    same, other = [], []
    for b in range(matrix.shape[0]):
        top = top_entries(matrix[b], n)
        ends1 = cells_in_boxes(grids[0], sizes[0], boxes1[b], rule)[top // columns]
        ends2 = cells_in_boxes(grids[1], sizes[1], boxes2[b], rule)[top % columns]
        s, o = kinds_of(ends1, ends2)
        same.append(s.double().mean())
        other.append(o.double().mean())
    return torch.stack(same), torch.stack(other)


def all_pairs(boxes1: Tensor, boxes2: Tensor, grids: Sequence[Grid], sizes: Sequence[Grid],
              rule: str = "centre") -> tuple[Tensor, Tensor]:
    """:func:`kinds_of` for every pair of cells of each pair of images: ``(B, P * Q)``
    each, pairs of cells in the order of the matrices' flat entries."""
    same, other = [], []
    for b in range(boxes1.shape[0]):
        ends1 = cells_in_boxes(grids[0], sizes[0], boxes1[b], rule)
        ends2 = cells_in_boxes(grids[1], sizes[1], boxes2[b], rule)
        p, q = ends1.shape[0], ends2.shape[0]
        s, o = kinds_of(ends1.repeat_interleave(q, 0), ends2.repeat(p, 1))
        same.append(s)
        other.append(o)
    return torch.stack(same), torch.stack(other)


def chance_shares(boxes1: Tensor, boxes2: Tensor, grids: Sequence[Grid],
                  sizes: Sequence[Grid], rule: str = "centre") -> tuple[Tensor, Tensor]:
    """The expected shares of :func:`match_shares` for matches drawn uniformly among all
    pairs of cells: the shares over every pair of cells."""
    same, other = all_pairs(boxes1, boxes2, grids, sizes, rule)
    return same.double().mean(1), other.double().mean(1)


def ceiling_shares(boxes1: Tensor, boxes2: Tensor, grids: Sequence[Grid],
                   sizes: Sequence[Grid], n: int, rule: str = "centre") -> Tensor:
    """The largest share of ``n`` matches that can join an object to itself: small objects
    on a coarse grid have fewer than ``n`` such pairs of cells. ``(B,)``."""
    same, _ = all_pairs(boxes1, boxes2, grids, sizes, rule)
    return same.sum(1).clamp_max(n).double() / n


def outer(maps: Tensor) -> Tensor:
    """A first-order matrix ``(B, P, Q)`` from two maps per pair ``(B, 2, h, w)``: the
    product of their positive parts, so its top entries join the two maps' peaks (a
    product of two negative cells would otherwise rank as a strong match)."""
    first, second = maps[:, 0].clamp_min(0).flatten(1), maps[:, 1].clamp_min(0).flatten(1)
    return first[:, :, None] * second[:, None, :]


def relative_error(estimate: Tensor, full: Tensor) -> Tensor:
    """``|M_r - M|_F / |M|_F`` per pair ``(B,)``."""
    return (estimate - full).flatten(1).norm(dim=1) / full.flatten(1).norm(dim=1).clamp_min(1e-30)


def top_overlap(estimate: Tensor, full: Tensor, n: int) -> Tensor:
    """The share of the full matrix's top-``n`` entries that are among the estimate's, per
    pair ``(B,)``."""
    out = []
    for a, b in zip(estimate, full):
        found = set(top_entries(a, n).tolist()) & set(top_entries(b, n).tolist())
        out.append(len(found) / n)
    return torch.tensor(out, dtype=torch.float64)


# --------------------------------------------------------------------------- heads


class GeMTail(nn.Module):
    """The network after the explained layer with generalised-mean pooling (``p = 3``),
    a retrieval head that is not global average pooling: the estimate's path."""

    def __init__(self, power: float = 3.0) -> None:
        super().__init__()
        self.features = nn.Identity()
        self.power = power

    def forward(self, activation: Tensor) -> Tensor:
        pooled = self.features(activation).clamp_min(1e-6).pow(self.power).mean(dim=(2, 3))
        return pooled.pow(1 / self.power)


def train_mlp_head(features: Tensor, labels: Tensor, hidden: int, dim: int, epochs: int,
                   seed: int) -> nn.Sequential:
    """A two-layer head (Linear, ReLU, Linear) trained with a triplet loss on pooled
    features, as the signed head is (:func:`_embedding_heads.train_signed_head`); its
    first bias starts at minus the projected mean, so the hidden units start centred."""
    torch.manual_seed(seed)
    head = nn.Sequential(nn.Linear(features.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, dim))
    with torch.no_grad():
        head[0].bias.copy_(-head[0].weight @ features.mean(0))
    return train_head(head, features, labels, epochs, seed)


def pair_retrieval(first: Tensor, second: Tensor, reference: Tensor) -> float:
    """The share of scenes ``first`` ``(B, d)`` whose nearest among ``second`` is their
    own partner, under the cosine measured from the reference's mean normalised
    embedding (the correspondence's score): whether the head re-identifies the pairs."""
    centre = F.normalize(reference.float(), dim=-1).mean(0)
    first, second = (F.normalize(F.normalize(x.float(), dim=-1) - centre, dim=-1)
                     for x in (first, second))
    similarity = first @ second.T
    return (similarity.argmax(1) == torch.arange(first.shape[0])).double().mean().item()
