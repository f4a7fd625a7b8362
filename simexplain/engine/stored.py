"""Maps from stored activations: only the head after the layer runs.

An image that has been through the model once (to index it) leaves the values crossing
the cut at the explained layer (:mod:`~simexplain.engine.head_split`). Explaining it
against any partner then runs the head alone: the layer's stored output becomes a leaf,
the head gives the embedding, and the engine's score, gradient and GradCAM combine
(:meth:`~simexplain.engine.SimilarityEngine.maps_of`) do the rest, exactly as after a
full forward. A map from float32 activations equals the full forward's up to float
rounding; float16 storage rounds the activations to 11 significant bits first.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..errors import InputError
from .engine import SimilarityEngine, TupleResult
from .embeddings import run_model
from .gradients import layer_gradient
from .head_split import HeadSplit, SplitFallback, cached_split, head_embeddings, layer_leaf
from .input_layout import run_in_layout
from .layouts import FeatureLayer
from .maps import full_precision
from .outputs import OutputSpec
from .score import SimilarityScore
from .state import model_device, model_dtype, preserved_state

__all__ = ["head_split", "run_trunk", "head_embeddings", "stored_chunks", "layer_leaf",
           "attribute_stored", "attribute_against", "STORED_CHUNK_SIZE"]

#: Tuples per head pass when ``chunk_size`` is not given: the head is a small part of the
#: model, so chunks can hold more tuples than a full forward's.
STORED_CHUNK_SIZE = 32


def head_split(
    engine: SimilarityEngine, sample: Tensor
) -> tuple[FeatureLayer, Union[HeadSplit, SplitFallback]]:
    """The engine's layer for images like ``sample`` ``(N, C, H, W)`` and the model cut
    there (or why it cannot be), computed once per layer and input shape."""
    if not engine.eval_mode:
        raise InputError("stored activations are explained in eval mode; build the engine "
                         "with eval_mode=True")
    layer = engine.feature_layer(sample[:2])
    return layer, cached_split(engine.model, layer, sample, engine.output)


def run_trunk(
    split: HeadSplit, model: nn.Module, images: Tensor, output: OutputSpec = None
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The raw embeddings ``(N, d)`` of ``images`` (picked by ``output``) and their
    crossing values, in one forward pass without gradients (eval mode; the model's state
    restored), the images in the model's layout (:mod:`~simexplain.engine.input_layout`)."""
    with preserved_state(model, eval_mode=True), torch.no_grad():
        value, crossing = run_in_layout(model, images, lambda x: run_model(split.trunk, x))
        return head_embeddings(value, images.shape[0], output), tuple(crossing)


def stored_chunks(
    model: nn.Module, split: HeadSplit, slots: Sequence[Sequence[Tensor]],
    chunk_size: Optional[int] = None,
) -> Iterator[tuple[int, int, list[Tensor]]]:
    """``(start, stop, values)`` for each chunk of ``chunk_size`` tuples (default
    :data:`STORED_CHUNK_SIZE`): the crossing values of their images, slot-major, in the
    model's device and dtype, ready for ``split.head``."""
    batch = slots[0][0].shape[0]
    chunk = chunk_size or STORED_CHUNK_SIZE
    device = model_device(model) or torch.device("cpu")
    dtype = model_dtype(model) or torch.float32
    for start in range(0, batch, chunk):
        stop = min(start + chunk, batch)
        yield start, stop, [torch.cat([slot[k][start:stop] for slot in slots]).to(device, dtype)
                            for k in range(len(split.names))]


def attribute_stored(
    engine: SimilarityEngine,
    split: HeadSplit,
    layer: FeatureLayer,
    slots: Sequence[Sequence[Tensor]],
    score: SimilarityScore,
    image_hw: tuple[int, int],
    *,
    relu: bool = True,
    chunk_size: Optional[int] = None,
) -> TupleResult:
    """Maps of tuples whose images are given by their stored crossing values.

    Args:
        engine: the engine of the model ``split`` was cut from.
        split, layer: from :func:`head_split`.
        slots: one entry per tuple slot, each the crossing values of ``B`` images (as
            :func:`run_trunk` returns them, in any dtype; converted to the model's).
        score: what the maps explain, as for
            :meth:`~simexplain.engine.SimilarityEngine.attribute`.
        image_hw: the input images' size (to read token layouts as a grid).
        relu: apply ReLU to the maps.
        chunk_size: tuples per head pass (default :data:`STORED_CHUNK_SIZE`).
    """
    count, batch = len(slots), slots[0][0].shape[0]
    score = score.bind(count, batch)
    parts = []
    with engine.session(*score.modules()):
        for start, stop, values in stored_chunks(engine.model, split, slots, chunk_size):
            activation = layer_leaf(split, values)
            embeddings = head_embeddings(split.head(*values), values[0].shape[0], engine.output)
            parts.append(engine.maps_of(activation, embeddings, count,
                                        score.chunk(start, stop), layer, image_hw, relu))
    return TupleResult.from_chunks(parts, score.kind(count), layer.name)


def attribute_against(
    engine: SimilarityEngine,
    split: HeadSplit,
    layer: FeatureLayer,
    partners: Tensor,
    crossing: Sequence[Tensor],
    score: SimilarityScore,
    image_hw: tuple[int, int],
    *,
    relu: bool = True,
    chunk_size: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """Maps ``(B, h, w)`` and scores ``(B,)`` of images given by their crossing values,
    each paired with a partner given only as an embedding ``(B, d)`` (a query without an
    image): ``score``'s pair with the partner in slot 0, explained in slot 1."""
    score = score.bind(2, partners.shape[0])
    maps, values = [], []
    with engine.session(*score.modules()):
        for start, stop, inputs in stored_chunks(engine.model, split, [crossing], chunk_size):
            activation = layer_leaf(split, inputs)
            embeddings = full_precision(
                head_embeddings(split.head(*inputs), stop - start, engine.output))
            pair = torch.stack([partners[start:stop].to(embeddings), embeddings])
            scored = score.chunk(start, stop)(pair).values[:, 1]
            gradient = layer_gradient(scored.sum(), activation)
            maps.append(engine.combine(activation, gradient, layer, image_hw, relu).detach())
            values.append(scored.detach())
    return torch.cat(maps), torch.cat(values)
