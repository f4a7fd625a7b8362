"""The criteria of paper SAM: vectors ``w`` that turn a tuple of embeddings into scores.

Each function takes L2-normalised embeddings of shape ``(B, d)``, one per slot of the
tuple, and returns ``w`` of shape ``(B, d)``. Image ``i`` of the tuple then gets the score
``s_i = w . f_i`` (:func:`similarity_scores`), whose gradient gives its map.

The formulas follow Zheng et al., "Visual Similarity Attention" (section 3 of the
paper; restated in the project's METHOD.md):

==========================  =======================================
tuple                       ``w``
==========================  =======================================
same-class pair             ``1 - |f1 - f2|``
different-class pair        ``|f1 - f2|``
triplet (a, p, n)           ``(1 - |fa - fp|) * |fa - fn|``
quadruplet (a, p, n1, n2)   ``(1 - |fa - fp|) * |fa - fn1| * |fa - fn2|``
==========================  =======================================

Any other criterion can be explained by passing a function with the same contract,
``weight_fn(*embeddings) -> Tensor`` of shape ``(B, d)`` or ``(d,)``::

    >>> import torch
    >>> import torch.nn.functional as F
    >>> from simexplain.methods.criteria import triplet_weights
    >>> fa, fp, fn = (F.normalize(torch.randn(2, 8), dim=1) for _ in range(3))
    >>> triplet_weights(fa, fp, fn).shape
    torch.Size([2, 8])
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..engine.tuples import TUPLE_SIZES
from ..errors import InputError

__all__ = [
    "WeightFn",
    "same_class_pair_weights",
    "different_class_pair_weights",
    "pair_weights",
    "triplet_weights",
    "quadruplet_weights",
    "weights_for_kind",
    "criterion_weights",
    "rescaled_weights",
    "similarity_scores",
]

#: A function of the tuple's normalised embeddings, one ``(B, d)`` tensor per slot,
#: returning ``w`` of shape ``(B, d)`` (or ``(d,)``, shared by all tuples).
WeightFn = Callable[..., Tensor]


def same_class_pair_weights(f1: Tensor, f2: Tensor) -> Tensor:
    """``w = 1 - |f1 - f2|``: large on dimensions where the two images agree."""
    return 1 - (f1 - f2).abs()


def different_class_pair_weights(f1: Tensor, f2: Tensor) -> Tensor:
    """``w = |f1 - f2|``: large on dimensions where the two images differ."""
    return (f1 - f2).abs()


def pair_weights(f1: Tensor, f2: Tensor, same_class: Tensor) -> Tensor:
    """Pair weights chosen per row by ``same_class``, a bool tensor of shape ``(B,)``."""
    diff = (f1 - f2).abs()
    return torch.where(same_class.reshape(-1, 1), 1 - diff, diff)


def triplet_weights(anchor: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
    """``w = (1 - |fa - fp|) * |fa - fn|``."""
    return (1 - (anchor - positive).abs()) * (anchor - negative).abs()


def quadruplet_weights(
    anchor: Tensor, positive: Tensor, negative1: Tensor, negative2: Tensor
) -> Tensor:
    """``w = (1 - |fa - fp|) * |fa - fn1| * |fa - fn2|``."""
    return triplet_weights(anchor, positive, negative1) * (anchor - negative2).abs()


_WEIGHT_FNS: dict[str, WeightFn] = {
    "same_pair": same_class_pair_weights,
    "different_pair": different_class_pair_weights,
    "triplet": triplet_weights,
    "quadruplet": quadruplet_weights,
}


def weights_for_kind(kind: str) -> WeightFn:
    """The weight function of a tuple kind (one of
    :data:`~simexplain.engine.tuples.TUPLE_SIZES`)."""
    try:
        return _WEIGHT_FNS[kind]
    except KeyError:
        raise ValueError(
            f"unknown tuple kind {kind!r}; expected one of {sorted(_WEIGHT_FNS)} "
            "or pass your own weight_fn"
        ) from None


def similarity_scores(weights: Tensor, embeddings: Sequence[Tensor]) -> Tensor:
    """Scores ``s_i = w . f_i`` for every slot, shape ``(B, T)``."""
    return torch.stack([(weights * f).sum(dim=-1) for f in embeddings], dim=1)


def criterion_weights(
    embeddings: Sequence[Tensor],
    same_class: Optional[Tensor] = None,
    weight_fn: Optional[WeightFn] = None,
) -> Tensor:
    """``w`` ``(B, d)`` of a chunk of tuples from their slots' normalised embeddings.

    ``weight_fn`` when given (checked to return ``(B, d)`` or ``(d,)``); else pairs take
    their formula per pair from ``same_class``, and triplets and quadruplets theirs.
    """
    batch, dim = embeddings[0].shape
    if weight_fn is not None:
        weights = weight_fn(*embeddings)
        if not isinstance(weights, Tensor) or weights.shape not in ((batch, dim), (dim,)):
            shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
            raise InputError(
                f"weight_fn returned {shape}; it must return w of shape ({batch}, {dim}) "
                f"or ({dim},)"
            )
        return weights.expand(batch, dim)
    if len(embeddings) == 2:
        return pair_weights(embeddings[0], embeddings[1], same_class.to(embeddings[0].device))
    kind = next(k for k, n in TUPLE_SIZES.items() if n == len(embeddings) and "pair" not in k)
    return weights_for_kind(kind)(*embeddings)


def rescaled_weights(embeddings: Sequence[Tensor], same_class: Optional[Tensor] = None) -> Tensor:
    """SAM's ``w`` with each ``|f_a - f_j|`` divided by its largest coordinate, so that
    ``w`` spans ``[0, 1]`` whatever the dimension (``sam_rescaled``).

    For L2-normalised ``d``-dimensional embeddings every ``|f1_k - f2_k|`` is of order
    ``1 / sqrt(d)``, so the paper's ``w = 1 - |f1 - f2|`` is nearly all ones; rescaled,
    the dimensions where the two images differ most get ``w = 0``.

    >>> import torch
    >>> f1, f2 = torch.tensor([[0.6, 0.8, 0.0]]), torch.tensor([[0.0, 0.8, 0.6]])
    >>> rescaled_weights([f1, f2], torch.tensor([True]))
    tensor([[0., 1., 0.]])
    """
    anchor = embeddings[0]
    tiny = torch.finfo(anchor.dtype).tiny
    diffs = [(anchor - f).abs() for f in embeddings[1:]]
    diffs = [d / d.amax(dim=-1, keepdim=True).clamp_min(tiny) for d in diffs]
    if len(embeddings) == 2:
        return torch.where(same_class.reshape(-1, 1).to(anchor.device), 1 - diffs[0], diffs[0])
    weights = 1 - diffs[0]
    for d in diffs[1:]:
        weights = weights * d
    return weights
