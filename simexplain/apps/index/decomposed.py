"""Decompositions (``stylianou``, ``point_specific``'s overall maps) from stored values.

A decomposition needs no gradient: the layer's output and the embedding. Both come from
the stored crossing values, the embedding by running the head without a graph.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from ...engine.engine import TupleResult
from ...engine.head_split import HeadSplit
from ...engine.layouts import FeatureLayer
from ...engine.state import preserved_state
from ...engine.stored import head_embeddings, stored_chunks
from ...methods.decomposition import Stylianou
from ..method_runner import decomposition_result

__all__ = ["decompose_stored"]


def decompose_stored(
    method: Stylianou,
    split: HeadSplit,
    layer: FeatureLayer,
    slots: Sequence[Sequence[Tensor]],
    target: Any,
    image_hw: tuple[int, int],
    *,
    chunk_size: Optional[int] = None,
    **options: Any,
) -> TupleResult:
    """``method``'s signed maps of tuples given by their crossing values (as
    :func:`~simexplain.engine.stored.attribute_stored` takes them)."""
    model = method.engine.model
    count, batch = len(slots), slots[0][0].shape[0]
    maps, embeddings = [], []
    with preserved_state(model, eval_mode=True), torch.no_grad():
        for start, stop, values in stored_chunks(model, split, slots, chunk_size):
            activation = values[split.activation_index].clone()
            output = head_embeddings(split.head(*values), values[0].shape[0],
                                     method.engine.output)
            located = method.shares_of(activation, output, count, layer, image_hw)
            maps.append(method.maps_of_shares(located, **options))
            embeddings.append(output.reshape(count, stop - start, -1))
    joined = torch.cat(embeddings, dim=1).reshape(count * batch, -1)
    return decomposition_result(torch.cat(maps), joined, target, None, layer.name)
