"""Maps from the full forward and from stored crossing values, for the split tests."""

from __future__ import annotations

from unittest import mock

import torch
from torch import Tensor, nn

from simexplain.apps.index.storage import decode_rows, encode_rows
from simexplain.engine import SimilarityEngine, SimilarityScore, TupleResult
from simexplain.engine.stored import attribute_stored, head_split, run_trunk
from simexplain.methods import get_method

#: Float16 storage (with a power-of-two scale per image) changes maps by at most this
#: share of the map's peak; the docs state it (docs/retrieval.rst).
FLOAT16_TOLERANCE = 3e-2


def hooked_attribute(engine: SimilarityEngine, slots: tuple[Tensor, ...],
                     score: SimilarityScore, relu: bool = True) -> TupleResult:
    """``engine.attribute`` by the hooked forward of the whole model in one chunk (the
    reference for maps computed another way: from stored values, through a narrowed
    head)."""
    layer = engine.feature_layer(slots[0][:2])
    bound = score.bind(len(slots), slots[0].shape[0])
    with engine.session(*bound.modules()):
        activation, embeddings = engine.forward(torch.cat(slots), layer)
        parts = engine.maps_of(activation, embeddings, len(slots), bound, layer,
                               tuple(slots[0].shape[-2:]), relu)
    return TupleResult.from_chunks([parts], bound.kind(len(slots)), layer.name)


def stored_and_full(model: nn.Module, images: Tensor, method: str = "contribution",
                    dtype: torch.dtype = torch.float32, relu: bool = False):
    """Maps of the pairs (images[0], images[1]) from the full forward and from stored
    crossing values (encoded in ``dtype``); ``None`` and the fallback for a model that
    does not split."""
    explainer = get_method(method)(model)
    score = explainer.score(torch.ones(images.shape[1], dtype=torch.bool))
    full = hooked_attribute(explainer.engine, (images[0], images[1]), score, relu=relu)
    layer, split = head_split(explainer.engine, images[0])
    if not split:
        return full, None, split
    slots = []
    for slot in images[:2]:
        _, crossing = run_trunk(split, model, slot)
        slots.append([decode_rows(*encode_rows(c, dtype)) for c in crossing])
    stored = attribute_stored(explainer.engine, split, layer, slots, score,
                              tuple(images.shape[-2:]), relu=relu)
    return full, stored, split


def narrowed_and_full(model: nn.Module, images: Tensor, method: str = "contribution"):
    """Maps of the pairs (images[0], images[1]) from the hooked forward and from
    ``engine.attribute`` told to split the model at once (through its narrowed head, for
    a class-token transformer)."""
    explainer = get_method(method)(model)
    score = explainer.score(torch.ones(images.shape[1], dtype=torch.bool))
    slots = (images[0], images[1])
    full = hooked_attribute(explainer.engine, slots, score, relu=False)
    with mock.patch("simexplain.engine._head_only.SPLIT_AFTER_IMAGES", 0):
        narrowed = explainer.engine.attribute(slots, score, relu=False)
    return full, narrowed


def relative_error(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
