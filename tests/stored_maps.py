"""Maps from the full forward and from stored crossing values, for the split tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from simexplain.apps.index.storage import decode_rows, encode_rows
from simexplain.engine.stored import attribute_stored, head_split, run_trunk
from simexplain.methods import get_method

#: Float16 storage (with a power-of-two scale per image) changes maps by at most this
#: share of the map's peak; the docs state it (docs/retrieval.rst).
FLOAT16_TOLERANCE = 3e-2


def stored_and_full(model: nn.Module, images: Tensor, method: str = "contribution",
                    dtype: torch.dtype = torch.float32, relu: bool = False):
    """Maps of the pairs (images[0], images[1]) from the full forward and from stored
    crossing values (encoded in ``dtype``); ``None`` and the fallback for a model that
    does not split."""
    explainer = get_method(method)(model)
    score = explainer.score(torch.ones(images.shape[1], dtype=torch.bool))
    full = explainer.engine.attribute((images[0], images[1]), score, relu=relu)
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


def relative_error(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
