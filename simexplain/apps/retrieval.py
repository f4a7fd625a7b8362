"""Retrieval with an embedding model, and why each match was retrieved.

A query is ranked against a gallery by exact cosine similarity (with faiss when it is
installed, else torch), and each (query, match) pair is explained as a same-class pair:
its maps show what makes the two images similar to the model. Embedding the images:
:mod:`simexplain.apps.gallery`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..attribution.embedding_attribution import EmbeddingAttribution
from ..engine.state import model_device
from ..engine.target_layer import LayerSpec
from ..errors import InputError, MissingExtraError
from ..methods.base import SimilarityMethod, get_method
from ..methods.defaults import DEFAULT_METHOD
from .index.result import RetrievalResult
from .method_runner import build_method, option_names, run_method

__all__ = [
    "faiss_available",
    "rank_gallery",
    "RetrievalExplanation",
    "explainer",
    "explain_matches",
]


def faiss_available() -> bool:
    """Whether ``import faiss`` works (the optional ``faiss`` extra)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


_BACKENDS = ("auto", "torch", "faiss")


def rank_gallery(
    queries: Tensor, gallery: Tensor, top_k: int, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Exact cosine ranking: the ``top_k`` gallery rows most similar to each query row.

    Args:
        queries: ``(Q, d)`` L2-normalised embeddings.
        gallery: ``(G, d)`` L2-normalised embeddings.
        top_k: matches per query; at most ``G`` are returned.
        backend: ``"torch"`` (a matrix product), ``"faiss"`` (an exact inner-product
            index, ``faiss.IndexFlatIP``, on the CPU; needs the ``faiss`` extra), or
            ``"auto"``: faiss when it is installed and the embeddings are on the CPU,
            else torch. Both give the same matches (up to the order of exact ties).

    Returns:
        ``similarities`` and ``indices``, both ``(Q, min(top_k, G))``, best first.

    Example:
        >>> q = torch.tensor([[1.0, 0.0]])
        >>> g = torch.tensor([[0.0, 1.0], [0.6, 0.8], [1.0, 0.0]])
        >>> sims, idx = rank_gallery(q, g, top_k=2)
        >>> idx.tolist(), sims.tolist()
        ([[2, 1]], [[1.0, 0.6000000238418579]])
    """
    if top_k < 1:
        raise InputError(f"top_k must be at least 1, got {top_k}")
    if queries.dim() != 2 or gallery.dim() != 2 or queries.shape[1] != gallery.shape[1]:
        raise InputError(
            f"queries {tuple(queries.shape)} and gallery {tuple(gallery.shape)} must be "
            "(Q, d) and (G, d) embeddings of the same dimension d"
        )
    if backend not in _BACKENDS:
        raise InputError(f"backend must be one of {', '.join(_BACKENDS)}; got {backend!r}")
    count = min(top_k, gallery.shape[0])
    on_cpu = queries.device.type == "cpu" and gallery.device.type == "cpu"
    if backend == "faiss" or (backend == "auto" and on_cpu and faiss_available()):
        return _rank_with_faiss(queries, gallery, count)
    similarities = queries @ gallery.T
    return similarities.topk(count, dim=1)


def _rank_with_faiss(queries: Tensor, gallery: Tensor, count: int) -> tuple[Tensor, Tensor]:
    try:
        import faiss
    except ImportError:
        raise MissingExtraError(
            "backend='faiss' needs faiss: pip install faiss-cpu (the faiss extra)"
        ) from None
    import numpy as np

    def as_array(x: Tensor) -> "np.ndarray":
        return np.ascontiguousarray(x.detach().float().cpu().numpy())

    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(as_array(gallery))
    similarities, indices = index.search(as_array(queries), count)
    return (
        torch.from_numpy(similarities).to(queries.device, queries.dtype),
        torch.from_numpy(indices).to(queries.device),
    )


#: The former name of :class:`~simexplain.RetrievalResult`, the one result type of
#: retrieval (:func:`explain_matches` and :meth:`GalleryIndex.explain
#: <simexplain.GalleryIndex.explain>`).
RetrievalExplanation = RetrievalResult


def explainer(
    model: nn.Module,
    layer: LayerSpec = None,
    method: str = DEFAULT_METHOD,
    gallery: Optional[Tensor] = None,
    **method_options: Any,
) -> SimilarityMethod:
    """The method that explains retrieved pairs, for :func:`explain_matches`: any name of
    :data:`~simexplain.methods.METHODS`, built with ``method_options`` (e.g. ``head=`` for
    ``"bce_gradcam"``). A method that takes a ``reference`` (the default, ``"psam"``) measures its
    maps from the mean of the ``gallery``'s embeddings ``(G, d)`` when given, the images a
    query is told apart from. Options the method takes when it runs go to
    :func:`explain_matches`."""
    if gallery is not None and "reference" in option_names(get_method(method))[0]:
        method_options.setdefault("reference", gallery)
    built, run_options = build_method(method, model, layer, **method_options)
    if run_options:
        raise InputError(
            f"{sorted(run_options)} are options of method {method!r} when it runs; "
            "pass them to explain_matches"
        )
    return built


def explain_matches(
    attribution: Union[EmbeddingAttribution, SimilarityMethod],
    query: Tensor,
    matches: Tensor,
    *,
    names: Sequence[str] = (),
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    **method_options: Any,
) -> RetrievalResult:
    """Explain why each of ``matches`` is similar to ``query``, with the full model for
    every pair (for a gallery, :class:`~simexplain.GalleryIndex` explains matches from
    stored activations at a fraction of the cost).

    Every (query, match) pair is explained as a same-class pair (``target=True``), so
    both maps show the evidence for similarity. The result holds one query: raw maps
    ``(1, k, h, w)``; ``result.image_maps(0)`` upsamples them to the images and scales
    each to [0, 1] (a decomposition's signed maps min-max, see
    :class:`~simexplain.Explanation`).

    Args:
        attribution: an :class:`EmbeddingAttribution` of the model, or a built method of
            any kind (:func:`explainer`, e.g. a decomposition); reused across queries, so
            the layer is found once.
        query: ``(C, H, W)`` the preprocessed query.
        matches: ``(k, C, H, W)`` the preprocessed matches.
        names, mean, std: carried into the result for figures.
        **method_options: the method's options when it runs (e.g. ``selection=`` for
            ``"sam_contrib"``).

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18(num_classes=16)
        >>> result = explain_matches(
        ...     EmbeddingAttribution(model), torch.randn(3, 64, 64), torch.randn(2, 3, 64, 64)
        ... )
        >>> tuple(result.query_maps.shape), tuple(result.image_maps(0)[1].shape)
        ((1, 2, 2, 2), (2, 64, 64))
    """
    if query.dim() != 3 or matches.dim() != 4 or matches.shape[1:] != query.shape:
        raise InputError(
            f"query {tuple(query.shape)} and matches {tuple(matches.shape)} must be "
            "(C, H, W) and (k, C, H, W) images of the same size"
        )
    count = matches.shape[0]
    device = model_device(attribution.model) or torch.device("cpu")
    queries = query.unsqueeze(0).expand(count, -1, -1, -1).to(device)
    pairs, same = (queries, matches.to(device)), torch.ones(count, dtype=torch.bool)
    if isinstance(attribution, EmbeddingAttribution):
        result = attribution.attribute_tuples(pairs, same, **method_options)
        method = attribution.method.name
    else:
        result = run_method(attribution, pairs, same, **method_options)
        method = attribution.name
    embeddings = result.embeddings.cpu()
    maps = result.maps.detach().cpu()
    return RetrievalResult(
        indices=torch.arange(count).unsqueeze(0),
        similarities=(embeddings[:, 0] * embeddings[:, 1]).sum(-1).unsqueeze(0),
        query_maps=maps[:, 0].unsqueeze(0),
        gallery_maps=maps[:, 1].unsqueeze(0),
        scores=result.scores.detach().cpu().unsqueeze(0),
        method=method,
        layer=result.layer,
        query_images=query.detach().cpu().unsqueeze(0),
        match_images=matches.detach().cpu().unsqueeze(0),
        names=[list(names)] if names else None,
        mean=mean,
        std=std,
    )
