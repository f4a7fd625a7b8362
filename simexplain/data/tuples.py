"""Random index tuples (pairs, triplets, quadruplets) drawn from class labels.

pytorch-metric-learning has random triplets (``get_random_triplet_indices``) but no pairs
of one kind or quadruplets, and draws from the global random state; this sampler covers
every tuple kind, is vectorised and deterministic given a ``torch.Generator``, and needs
no optional dependency (the demo uses it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..engine.tuples import TUPLE_SIZES

__all__ = ["sample_tuples"]


def sample_tuples(
    labels: Tensor,
    kind: str,
    n: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw ``n`` random index tuples of the given kind from ``labels``.

    Kinds and columns:

    * ``"same_pair"``: ``(i, j)`` with the same label, ``i != j``;
    * ``"different_pair"``: ``(i, j)`` with different labels;
    * ``"triplet"``: ``(anchor, positive, negative)``;
    * ``"quadruplet"``: ``(anchor, positive, negative1, negative2)``; both negatives
      differ in label from the anchor, and from each other when there are three or more
      classes.

    Anchors are uniform over the examples that can serve as one (those with another
    example of the same class when a positive is needed); positives are uniform over
    the other examples of the anchor's class; negatives pick a uniform other class,
    then a uniform example of it. Vectorised; deterministic given ``generator``.

    Returns:
        int64 tensor ``(n, T)`` of indices into ``labels``, ``T`` from
        :data:`~simexplain.engine.tuples.TUPLE_SIZES`.
    """
    if kind not in TUPLE_SIZES:
        raise ValueError(f"kind must be one of {sorted(TUPLE_SIZES)}, got {kind!r}")
    labels = torch.as_tensor(labels).reshape(-1).long().cpu()
    width = TUPLE_SIZES[kind]
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n == 0:
        return torch.zeros(0, width, dtype=torch.int64)

    # Group example indices by class: order[start[c] : start[c] + count[c]] are class c.
    classes, cls_of, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    num_cls = len(classes)
    order = torch.argsort(cls_of, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(labels)) - starts[cls_of[order]]

    need_pos = kind != "different_pair"
    need_neg = kind != "same_pair"
    if need_neg and num_cls < 2:
        raise ValueError(f"{kind!r} needs at least two classes, labels have {num_cls}")
    eligible = torch.ones(len(labels), dtype=torch.bool)
    if need_pos:
        eligible = counts[cls_of] >= 2
        if not bool(eligible.any()):
            raise ValueError(f"{kind!r} needs a class with at least two examples")
    pool = torch.nonzero(eligible).flatten()
    anchor = pool[torch.randint(len(pool), (n,), generator=generator)]
    a_cls = cls_of[anchor]
    cols = [anchor]

    if need_pos:
        cnt = counts[a_cls]
        shift = 1 + (torch.rand(n, generator=generator) * (cnt - 1)).long().clamp_max(cnt - 2)
        cols.append(order[starts[a_cls] + (rank[anchor] + shift) % cnt])

    def member(cls: Tensor) -> Tensor:
        pick = (torch.rand(n, generator=generator) * counts[cls]).long()
        return order[starts[cls] + pick.clamp_max(counts[cls] - 1)]

    if need_neg:
        k1 = torch.randint(1, num_cls, (n,), generator=generator)
        cols.append(member((a_cls + k1) % num_cls))
        if kind == "quadruplet":
            if num_cls >= 3:
                # A second offset in [1, num_cls) different from k1.
                step = torch.randint(1, num_cls - 1, (n,), generator=generator)
                k2 = 1 + (k1 - 1 + step) % (num_cls - 1)
            else:
                k2 = k1
            cols.append(member((a_cls + k2) % num_cls))

    return torch.stack(cols, dim=1)
