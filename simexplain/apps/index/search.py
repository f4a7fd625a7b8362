"""Nearest gallery embeddings: exact inner product (faiss or torch), or faiss's HNSW."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ...errors import InputError, MissingExtraError
from ..retrieval import rank_gallery

__all__ = ["EmbeddingSearch"]


class EmbeddingSearch:
    """Search over L2-normalised gallery embeddings ``(G, d)``.

    Exact search ranks by :func:`~simexplain.apps.retrieval.rank_gallery` (faiss's
    ``IndexFlatIP`` when installed, else a matrix product). ``approximate=True`` builds
    faiss's ``IndexHNSWFlat`` once (inner product, 32 links per node) and searches it: for
    galleries where an exact scan per query is too slow; its matches may miss a few of the
    exact ones.

    Example:
        >>> search = EmbeddingSearch(torch.eye(3))
        >>> search(torch.tensor([[0.0, 1.0, 0.0]]), top_k=1)[1].tolist()
        [[1]]
    """

    def __init__(self, embeddings: Tensor) -> None:
        self.embeddings = embeddings
        self._hnsw: Optional[Any] = None

    def __call__(self, queries: Tensor, top_k: int, *, approximate: bool = False
                 ) -> tuple[Tensor, Tensor]:
        if not approximate:
            return rank_gallery(queries, self.embeddings, top_k)
        if top_k < 1:
            raise InputError(f"top_k must be at least 1, got {top_k}")
        try:
            import faiss
        except ImportError:
            raise MissingExtraError("approximate search needs faiss: pip install "
                                    "faiss-cpu (the faiss extra)") from None
        if self._hnsw is None:
            self._hnsw = faiss.IndexHNSWFlat(self.embeddings.shape[1], 32,
                                             faiss.METRIC_INNER_PRODUCT)
            self._hnsw.add(self.embeddings.contiguous().numpy())
        count = min(top_k, self.embeddings.shape[0])
        similarities, indices = self._hnsw.search(queries.contiguous().numpy(), count)
        return torch.from_numpy(similarities), torch.from_numpy(indices)
