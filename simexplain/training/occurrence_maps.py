"""Differentiable maps of the tuples mined from a batch, for the mining term.

An image of the batch can stand in several tuples, each with its own ``w``: its map is
computed once per (tuple, slot) occurrence, from the training forward pass itself.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..engine.engine import SimilarityEngine
from ..engine.layouts import FeatureLayer

__all__ = ["occurrence_maps"]


def occurrence_maps(
    engine: SimilarityEngine,
    activation: Tensor,
    normalized: Tensor,
    layer: FeatureLayer,
    occurrences: Tensor,
    weights: Tensor,
    image_hw: Sequence[int],
    relu: bool = True,
) -> Tensor:
    """Maps ``(len(occurrences), h, w)`` of each (tuple, slot) occurrence, with a graph.

    ``occurrences`` holds the batch row of every occurrence and ``weights`` its tuple's
    ``w``. One vector-Jacobian product gives the layer gradient of ``w . f`` for every
    image at once (``w`` held fixed for the map, yet in the graph for training), so the
    occurrences are split into rounds in which each image appears at most once.
    """
    sorted_images, order = torch.sort(occurrences, stable=True)
    first = torch.searchsorted(sorted_images, sorted_images)
    rank = torch.empty_like(occurrences)
    rank[order] = torch.arange(len(occurrences), device=occurrences.device) - first
    image_hw = (int(image_hw[0]), int(image_hw[1]))
    maps, positions = [], []
    for r in range(int(rank.max()) + 1):
        chosen = (rank == r).nonzero().squeeze(1)
        rows = occurrences[chosen]
        grad_outputs = torch.zeros_like(normalized).index_put(
            (rows,), weights[chosen].to(normalized.dtype)
        )
        gradient = engine.layer_gradient(
            normalized, activation, grad_outputs, retain_graph=True, create_graph=True
        )
        maps.append(engine.combine(activation[rows], gradient[rows], layer, image_hw, relu))
        positions.append(chosen)
    stacked = torch.cat(maps)
    result = torch.empty_like(stacked)
    result[torch.cat(positions)] = stacked
    return result
