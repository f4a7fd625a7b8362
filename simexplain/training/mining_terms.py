"""The mining term ``L_sm`` on embeddings of tuples masked where their maps are high.

Which way it pushes is a choice (METHOD.md section 2, step 4; issue 24):

* ``"erase"`` (GAIN's attention mining): the masked tuple should *fail* its criterion.
  Once the term is small, erasing what the maps show leaves nothing that makes the
  tuple meet it: the maps have found all of the evidence.
* ``"drop"`` (WS-DAN's attention dropping, Hu et al. 2019): the masked tuple should
  still *meet* its criterion, so the network learns to use evidence beyond what the maps
  show.
* ``"paper"``: the terms as the paper's equations read, which mix the two: a same-class
  pair is erased (``-||f1* - f2*||``), a triplet or quadruplet is dropped
  (``||fa* - fp*|| - ||fa* - fn*||``). It is the default: on a pretrained backbone
  (``benchmarks/results/reproduce_pretrained.md``) it was the better direction for every
  tuple kind, though no direction gained over training without the term.

Both directions are written through the tuple's *slack*, ``g``, which is positive when
the masked tuple meets its criterion with margin ``m``:

* same-class pair: ``g = m - ||f1* - f2*||`` (the pair counts as similar within ``m``);
* triplet: ``g = ||fa* - fn*|| - ||fa* - fp*|| - m`` (the anchor nearer its positive by
  ``m``);
* quadruplet: the triplet slack for each negative, the two terms summed.

Without a margin (``margin=None``, the paper's form) the term is linear: ``-g`` to drop,
``g`` to erase, with ``m = 0``; it never stops pushing. With a margin it is a hinge:
``relu(-g)`` to drop (for a triplet, the triplet margin loss on the masked tuple), and
``relu(g)`` to erase (zero once the masked tuple no longer meets its criterion), so a
tuple whose masks have done their work adds no gradient.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.tuples import TUPLE_SIZES
from ..errors import InputError

__all__ = [
    "MINING_DIRECTIONS",
    "triplet_mining_term",
    "same_pair_mining_term",
    "quadruplet_mining_term",
    "criterion_slack",
    "mining_term",
    "SimilarityMiningLoss",
]

#: Which way the mining term pushes (see the module docs).
MINING_DIRECTIONS = ("paper", "erase", "drop")

# A small floor under squared distances: keeps the distance's gradient finite when
# two masked embeddings coincide.
_DISTANCE_EPS = 1e-12


def _distance(a: Tensor, b: Tensor) -> Tensor:
    return ((a - b).pow(2).sum(dim=-1) + _DISTANCE_EPS).sqrt()


def triplet_mining_term(anchor: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
    """The paper's triplet term ``||fa* - fp*|| - ||fa* - fn*||`` per tuple (drop)."""
    return _distance(anchor, positive) - _distance(anchor, negative)


def same_pair_mining_term(first: Tensor, second: Tensor) -> Tensor:
    """The paper's same-class pair term ``-||f1* - f2*||`` per pair (erase)."""
    return -_distance(first, second)


def quadruplet_mining_term(
    anchor: Tensor, positive: Tensor, negative1: Tensor, negative2: Tensor
) -> Tensor:
    """The paper's triplet term for each negative, summed, per tuple (drop)."""
    return triplet_mining_term(anchor, positive, negative1) + triplet_mining_term(
        anchor, positive, negative2
    )


def _pair_slack(first: Tensor, second: Tensor, margin: float) -> Tensor:
    return (margin - _distance(first, second))[:, None]


def _triplet_slack(anchor: Tensor, positive: Tensor, *negatives: Tensor, margin: float) -> Tensor:
    near = _distance(anchor, positive)
    return torch.stack([_distance(anchor, n) - near - margin for n in negatives], dim=1)


_SLACKS: dict[str, Callable[..., Tensor]] = {
    "same_pair": _pair_slack,
    "triplet": lambda a, p, n, margin: _triplet_slack(a, p, n, margin=margin),
    "quadruplet": lambda a, p, n1, n2, margin: _triplet_slack(a, p, n1, n2, margin=margin),
}


def criterion_slack(kind: str, *embeddings: Tensor, margin: float = 0.0) -> Tensor:
    """``(T, k)``: by how much each tuple meets its criterion with ``margin`` (positive:
    met), one column per comparison (a quadruplet's two negatives; one otherwise)."""
    return _SLACKS[kind](*embeddings, margin)


def _paper_direction(kind: str) -> str:
    return "erase" if kind == "same_pair" else "drop"


def mining_term(
    kind: str, *embeddings: Tensor, direction: str = "paper", margin: Optional[float] = None
) -> Tensor:
    """The mining term per tuple ``(T,)`` on (normalised) masked embeddings, one ``(T, d)``
    batch per slot: linear without ``margin``, a hinge at ``margin`` with one (see the
    module docs for what each direction pushes).

    Example:
        >>> import torch
        >>> a, p, n = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), -torch.eye(2)[:1]
        >>> mining_term("triplet", a, p, n, direction="drop")  # ||a-p|| - ||a-n||
        tensor([-0.5858])
        >>> mining_term("triplet", a, p, n, direction="erase", margin=0.2)  # relu(2-1.41-0.2)
        tensor([0.3858])
    """
    direction = _paper_direction(kind) if direction == "paper" else direction
    slack = criterion_slack(kind, *embeddings, margin=0.0 if margin is None else margin)
    signed = slack if direction == "erase" else -slack
    return (signed if margin is None else F.relu(signed)).sum(dim=1)


def check_direction(direction: object, margin: object) -> None:
    """Raise :class:`~simexplain.errors.InputError` for a direction or margin that is wrong."""
    if direction not in MINING_DIRECTIONS:
        raise InputError(
            f"direction must be one of {MINING_DIRECTIONS}: 'erase' (masked tuples should "
            "fail their criterion), 'drop' (they should still meet it) or 'paper' (the "
            f"paper's terms); got {direction!r}"
        )
    if margin is not None and (
        isinstance(margin, bool) or not isinstance(margin, (int, float))
        or not 0 <= margin < float("inf")
    ):
        raise InputError(
            f"mining_margin must be None (the linear terms) or a finite number >= 0 (a "
            f"hinge at that margin), got {margin!r}"
        )


class SimilarityMiningLoss(nn.Module):
    """The mining term ``L_sm`` averaged over tuples, from embeddings of masked images.

    Args:
        kind: ``"same_pair"``, ``"triplet"`` or ``"quadruplet"``. Different-class pairs
            have no mining term.
        direction: ``"paper"`` (the default), ``"erase"`` or ``"drop"`` (module docs).
        margin: ``None`` for the linear terms, or the hinge's margin: the distance
            within which a same-class pair counts as similar, or by which a triplet's
            anchor must be nearer its positive than its negative.

    ``forward(*embeddings)`` takes one ``(T, d)`` tensor per slot (raw embeddings; they
    are L2-normalised here) and returns a scalar; zero when there are no tuples.

    Example:
        >>> import torch
        >>> loss = SimilarityMiningLoss("triplet")
        >>> a = torch.tensor([[1.0, 0.0]])
        >>> round(float(loss(a, a, torch.tensor([[0.0, 1.0]]))), 4)  # 0 - sqrt(2)
        -1.4142
    """

    def __init__(
        self, kind: str = "triplet", direction: str = "paper", margin: Optional[float] = None
    ) -> None:
        super().__init__()
        if kind not in _SLACKS:
            raise InputError(
                f"kind must be one of {sorted(_SLACKS)}, got {kind!r} "
                "(different-class pairs add no mining term)"
            )
        check_direction(direction, margin)
        self.kind = kind
        self.direction = direction
        self.margin = None if margin is None else float(margin)
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
        return mining_term(self.kind, *normalized, direction=self.direction,
                           margin=self.margin).mean()

    def extra_repr(self) -> str:
        margin = "" if self.margin is None else f", margin={self.margin}"
        return f"kind={self.kind!r}, direction={self.direction!r}{margin}"
