"""The mining term ``L_sm``: how well masked tuples still meet their criterion.

On embeddings of images masked where their maps are high (METHOD.md section 2, step 4):
small when the masked anchor is no nearer its positive than its negative, i.e. when the
maps have found the evidence.
"""

from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.tuples import TUPLE_SIZES
from ..errors import InputError

__all__ = [
    "triplet_mining_term",
    "same_pair_mining_term",
    "quadruplet_mining_term",
    "SimilarityMiningLoss",
]

# A small floor under squared distances: keeps the distance's gradient finite when
# two masked embeddings coincide.
_DISTANCE_EPS = 1e-12


def _distance(a: Tensor, b: Tensor) -> Tensor:
    return ((a - b).pow(2).sum(dim=-1) + _DISTANCE_EPS).sqrt()


def triplet_mining_term(anchor: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
    """``||fa* - fp*|| - ||fa* - fn*||`` per tuple, on embeddings of masked images."""
    return _distance(anchor, positive) - _distance(anchor, negative)


def same_pair_mining_term(first: Tensor, second: Tensor) -> Tensor:
    """``-||f1* - f2*||`` per same-class pair, on embeddings of masked images."""
    return -_distance(first, second)


def quadruplet_mining_term(
    anchor: Tensor, positive: Tensor, negative1: Tensor, negative2: Tensor
) -> Tensor:
    """The triplet term for each negative, summed, per tuple."""
    return triplet_mining_term(anchor, positive, negative1) + triplet_mining_term(
        anchor, positive, negative2
    )


_MINING_TERMS: dict[str, Callable[..., Tensor]] = {
    "same_pair": same_pair_mining_term,
    "triplet": triplet_mining_term,
    "quadruplet": quadruplet_mining_term,
}


class SimilarityMiningLoss(nn.Module):
    """The mining term ``L_sm`` averaged over tuples, from embeddings of masked images.

    Args:
        kind: ``"same_pair"``, ``"triplet"`` or ``"quadruplet"``. Different-class pairs
            have no mining term.

    ``forward(*embeddings)`` takes one ``(T, d)`` tensor per slot (raw embeddings; they
    are L2-normalised here) and returns a scalar; zero when there are no tuples.

    Example:
        >>> import torch
        >>> loss = SimilarityMiningLoss("triplet")
        >>> a = torch.tensor([[1.0, 0.0]])
        >>> round(float(loss(a, a, torch.tensor([[0.0, 1.0]]))), 4)  # 0 - sqrt(2)
        -1.4142
    """

    def __init__(self, kind: str = "triplet") -> None:
        super().__init__()
        if kind not in _MINING_TERMS:
            raise InputError(
                f"kind must be one of {sorted(_MINING_TERMS)}, got {kind!r} "
                "(different-class pairs add no mining term)"
            )
        self.kind = kind
        self.num_slots = TUPLE_SIZES[kind]

    def forward(self, *embeddings: Tensor) -> Tensor:
        if len(embeddings) != self.num_slots:
            raise InputError(
                f"a {self.kind} mining term takes {self.num_slots} embedding batches, "
                f"got {len(embeddings)}"
            )
        if embeddings[0].shape[0] == 0:
            return embeddings[0].sum() * 0
        # half-precision embeddings (autocast) are compared in float32
        normalized = [
            F.normalize(e.float() if e.element_size() < 4 else e, dim=-1) for e in embeddings
        ]
        return _MINING_TERMS[self.kind](*normalized).mean()

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"
