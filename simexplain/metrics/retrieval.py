"""Retrieval accuracy of embedding models: Recall@K with exact cosine similarity.

The protocol of the deep metric learning benchmarks (CUB-200-2011, Cars196, Stanford
Online Products): every test image is a query against all the other test images, and a
query counts as a hit at ``K`` when one of its ``K`` nearest neighbours (cosine
similarity, the query itself left out) has its class.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError

__all__ = ["recall_at_k"]


def recall_at_k(
    embeddings: Tensor,
    labels: Tensor,
    ks: Sequence[int] = (1, 2, 4),
    chunk_size: int = 1024,
) -> dict[int, float]:
    """Leave-one-out Recall@K of ``embeddings`` under exact cosine similarity.

    Queries are processed ``chunk_size`` at a time against the whole set, so the largest
    temporary is ``(chunk_size, N)``: 10,000 embeddings need about 40 MB, not 400 MB.
    Ties between neighbours are broken by ``torch.topk``.

    Args:
        embeddings: ``(N, d)``, normalised or not (they are L2-normalised here).
        labels: ``(N,)`` integer class labels.
        ks: the values of ``K``, each in ``[1, N - 1]``.
        chunk_size: queries per similarity block.

    Returns:
        ``{K: recall}``, each recall the fraction of queries (in [0, 1]) with a
        same-class item among their ``K`` nearest neighbours.

    Example:
        >>> import torch
        >>> f = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> recall_at_k(f, torch.tensor([0, 0, 1, 1]), ks=(1, 2))
        {1: 1.0, 2: 1.0}
        >>> recall_at_k(f, torch.tensor([0, 1, 0, 1]), ks=(1, 2))
        {1: 0.0, 2: 0.5}
    """
    embeddings, labels, ks = _check_inputs(embeddings, labels, ks, chunk_size)
    count = embeddings.shape[0]
    with torch.no_grad():
        unit = F.normalize(embeddings.float(), dim=1)
        hits = torch.zeros(len(ks), dtype=torch.long, device=unit.device)
        largest = max(ks)
        for start in range(0, count, chunk_size):
            queries = unit[start : start + chunk_size]
            similarity = queries @ unit.T
            rows = torch.arange(queries.shape[0], device=unit.device)
            similarity[rows, rows + start] = float("-inf")  # a query is not its own neighbour
            neighbours = similarity.topk(largest, dim=1).indices
            same = labels[neighbours] == labels[start : start + chunk_size, None]
            first_hit = torch.where(
                same.any(dim=1), same.float().argmax(dim=1), torch.full_like(rows, largest)
            )
            for i, k in enumerate(ks):
                hits[i] += (first_hit < k).sum()
    return {k: float(h) / count for k, h in zip(ks, hits.tolist())}


def _check_inputs(
    embeddings: Tensor, labels: Tensor, ks: Sequence[int], chunk_size: int
) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    if not isinstance(embeddings, Tensor) or embeddings.dim() != 2:
        shape = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings)
        raise InputError(f"embeddings must be a (N, d) tensor, got {shape}")
    labels = torch.as_tensor(labels, device=embeddings.device)
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0] or labels.is_floating_point():
        raise InputError(
            f"labels must be integer class labels of shape ({embeddings.shape[0]},), one per "
            f"embedding; got {labels.dtype} of shape {tuple(labels.shape)}"
        )
    if not bool(torch.isfinite(embeddings).all()):
        raise InputError("embeddings contain NaN or infinite values")
    if isinstance(ks, int):
        ks = (ks,)
    ks = tuple(ks)
    count = embeddings.shape[0]
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
        raise InputError(f"ks must be positive ints, got {ks!r}")
    if max(ks) > count - 1:
        raise InputError(
            f"Recall@{max(ks)} needs at least {max(ks) + 1} embeddings (a query's own "
            f"embedding is left out), got {count}"
        )
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise InputError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return embeddings, labels, ks
