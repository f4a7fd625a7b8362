"""Differentiable maps of the tuples mined from a batch, for the mining term.

An image of the batch can stand in several tuples, each with its own weight vector: its
map is computed once per (tuple, slot) occurrence, from the training forward pass itself.
Every method the mining term supports scores image ``i`` of a tuple as ``v_i . u_i``, with
``u`` the (normalised, maybe centred) embedding and ``v_i`` a vector from the tuple: paper
SAM's ``w`` for every slot, or the cosine family's ``sum_j c_ij u_j``
(:func:`mining_directions`); for ``contribution`` ``u`` is the raw embedding and ``v_i``
carries the norms.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..engine.engine import SimilarityEngine
from ..engine.layouts import FeatureLayer
from ..errors import InputError
from ..methods.cosine import cosine_coefficients, unit_directions
from ..methods.criteria import weights_for_kind

__all__ = ["MINING_METHODS", "mining_directions", "occurrence_maps"]

#: The explanation methods whose maps can drive the mining mask.
MINING_METHODS = ("contribution", "psam", "gradcam_cosine", "sam")


def mining_directions(
    method: str,
    embeddings: Tensor,
    mining_tuples: Sequence[Tensor],
    kind: str,
    centre: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """``(u, v)``: what each occurrence's score differentiates, ``u`` ``(N, d)`` over the
    batch, and its vector ``v`` ``(len(occurrences), d)``, slot-major (every tuple's first
    image, then every second image, ...) from the batch's raw ``embeddings``. ``v`` stays
    in the graph, so the training gradient is that of the loss itself; the maps hold it
    fixed."""
    if method == "sam":
        normalized = F.normalize(embeddings, dim=-1)
        weights = weights_for_kind(kind)(*[normalized[t] for t in mining_tuples])
        return normalized, weights.repeat(len(mining_tuples), 1)
    if method not in MINING_METHODS:
        raise InputError(f"method must be one of {MINING_METHODS}, got {method!r}")
    if method == "gradcam_cosine":
        centre = None
    units = unit_directions(embeddings, centre)
    slots = [units[t] for t in mining_tuples]
    coefficients = cosine_coefficients(len(slots)).to(units)
    partners = [sum(coefficients[k, j] * slots[j] for j in range(len(slots)) if j != k)
                for k in range(len(slots))]
    if method != "contribution":
        return units, torch.cat(partners)
    # The contribution reading's gradient is v / (|f| |f_hat - m|) applied to f itself:
    # the norms scale v (in the graph, so training sees their true gradient) instead of
    # being held fixed inside u.
    lengths = embeddings.norm(dim=-1).clamp_min(1e-12)
    if centre is not None:
        unit = F.normalize(embeddings, dim=-1)
        lengths = lengths * (unit - centre.to(unit)).norm(dim=-1).clamp_min(1e-12)
    scale = torch.cat([lengths[t] for t in mining_tuples])[:, None]
    return embeddings, torch.cat(partners) / scale


def occurrence_maps(
    engine: SimilarityEngine,
    activation: Tensor,
    units: Tensor,
    layer: FeatureLayer,
    occurrences: Tensor,
    vectors: Tensor,
    image_hw: Sequence[int],
    relu: bool = True,
    create_graph: bool = True,
) -> Tensor:
    """Maps ``(len(occurrences), h, w)`` of each (tuple, slot) occurrence, with a graph
    (without one, and detached, when ``create_graph`` is false).

    ``occurrences`` holds the batch row of every occurrence and ``vectors`` its ``v``
    (:func:`mining_directions`). One vector-Jacobian product gives the layer gradient of
    ``v . u`` for every image at once (``v`` held fixed for the map, yet in the graph for
    training), so the occurrences are split into rounds in which each image appears at
    most once; when the training forward coupled the images (a train-mode batch norm
    after the layer), every occurrence is a round of its own.
    """
    if engine.couples_images:  # each occurrence's own gradient (engine.gradients)
        rank = torch.arange(len(occurrences), device=occurrences.device)
    else:
        sorted_images, order = torch.sort(occurrences, stable=True)
        first = torch.searchsorted(sorted_images, sorted_images)
        rank = torch.empty_like(occurrences)
        rank[order] = torch.arange(len(occurrences), device=occurrences.device) - first
    image_hw = (int(image_hw[0]), int(image_hw[1]))
    maps, positions = [], []
    for r in range(int(rank.max()) + 1):
        chosen = (rank == r).nonzero().squeeze(1)
        rows = occurrences[chosen]
        grad_outputs = torch.zeros_like(units).index_put((rows,), vectors[chosen].to(units.dtype))
        gradient = engine.layer_gradient(
            units, activation, grad_outputs, retain_graph=True, create_graph=create_graph
        )
        chosen_activation = activation[rows] if create_graph else activation[rows].detach()
        maps.append(engine.combine(chosen_activation, gradient[rows], layer, image_hw, relu))
        positions.append(chosen)
    stacked = torch.cat(maps)
    result = torch.empty_like(stacked)
    result[torch.cat(positions)] = stacked
    return result
