"""Weight vectors ``w`` that turn a tuple of embeddings into per-image scores.

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
    >>> from simexplain.weights import l2_normalize, triplet_weights
    >>> fa, fp, fn = (l2_normalize(torch.randn(2, 8)) for _ in range(3))
    >>> triplet_weights(fa, fp, fn).shape
    torch.Size([2, 8])
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "KINDS",
    "WeightFn",
    "l2_normalize",
    "same_class_pair_weights",
    "different_class_pair_weights",
    "pair_weights",
    "triplet_weights",
    "quadruplet_weights",
    "weights_for_kind",
    "similarity_scores",
]

#: Tuple kinds and the number of images each one has.
KINDS: dict[str, int] = {
    "same_pair": 2,
    "different_pair": 2,
    "triplet": 3,
    "quadruplet": 4,
}

#: A function of the tuple's normalised embeddings, one ``(B, d)`` tensor per slot,
#: returning ``w`` of shape ``(B, d)`` (or ``(d,)``, shared by all tuples).
WeightFn = Callable[..., Tensor]


def l2_normalize(embeddings: Tensor, eps: float = 1e-12) -> Tensor:
    """Divide each row by ``max(||row||, eps)``."""
    return embeddings / embeddings.norm(dim=-1, keepdim=True).clamp_min(eps)


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
    """The weight function of a tuple kind (one of :data:`KINDS`)."""
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
