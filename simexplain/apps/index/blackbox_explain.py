"""Explaining an index's matches with a black-box method (``"sbsm"``, ``"rise"``).

A model without gradients (an ONNX model, a function) stores no activations, so each
(query, match) pair is explained as a same-class pair by perturbing both images: the
query, and the match read from the gallery's images (so the index needs them: a gallery
of files, or ``gallery=`` given to :meth:`~simexplain.GalleryIndex.load`). Within a block
of queries every image is perturbed once
(:meth:`~simexplain.methods.blackbox.BlackBoxMethod.run_shared`): a query's perturbations
are scored against all of its ``k`` matches, and a gallery image against every query it
matches. A pair costs at most the
method's forward passes per image for each of its two images (``sbsm``: 64 per image at
its default windows; ``rise``: ``n_masks``), a query's shared by its ``k`` matches.
Failures (labels on both sides) are explained as triplets in the same run, their images
perturbed along with the pairs'. Queries given as embeddings get their matches' maps
alone, each match perturbed against the query's embedding held fixed. Maps are at the
method's raw resolution: the grid of window positions (``sbsm``) or the input's pixels
(``rise``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import Tensor

from ...engine.state import model_device
from ...errors import InputError
from ...methods.base import get_method
from ...methods.blackbox import BlackBoxMethod, TupleGroup
from ..method_runner import build_method
from ..onnx_model import OnnxModel, no_gradients_error
from .explain import failed_queries
from .result import RetrievalFailures

if TYPE_CHECKING:
    from .gallery_index import GalleryIndex

__all__ = ["black_box_explainers"]

Part = tuple[dict, Optional[RetrievalFailures]]


def black_box_explainers(
    index: "GalleryIndex", name: str, chunk_size: Optional[int], options: dict[str, Any],
) -> tuple[Callable[..., Part], Callable[..., Part]]:
    """What explains a block of queries given as images, and as embeddings, with the
    black-box method ``name`` built from ``options`` (its ``reference`` the gallery's
    embeddings unless given)."""
    if not get_method(name).blackbox:
        what = "an ONNX model" if isinstance(index.model, OnnxModel) else \
            f"the index's model, a {type(index.model).__name__} that is not a PyTorch module,"
        raise no_gradients_error(name, what)
    if chunk_size is not None:
        raise InputError(f"method {name!r} is a black-box method: it takes batch_size= "
                         "(perturbed images per forward pass), not chunk_size=")
    options = {"reference": index.embeddings, "output": index.engine.output, **options}
    method, run_options = build_method(name, index.model, None, **options)
    if run_options:
        raise InputError(f"the index explains each match as a same-class pair, so method "
                         f"{name!r} takes no {', '.join(sorted(run_options))} here")
    assert isinstance(method, BlackBoxMethod)

    def explain_images(images: Tensor, top_k: int, labels: Optional[list],
                       approximate: bool) -> Part:
        return _explain_images(index, method, images, top_k, labels, approximate)

    def explain_embeddings(embeddings: Tensor, top_k: int, approximate: bool) -> Part:
        return _explain_embeddings(index, method, embeddings, top_k, approximate)

    return explain_images, explain_embeddings


def _places(gallery_rows: Tensor, rows: Tensor, offset: int) -> Tensor:
    """The places of gallery ``rows`` in a pool holding ``gallery_rows`` from ``offset``."""
    return offset + torch.searchsorted(gallery_rows, rows.reshape(-1))


def _explain_images(index: "GalleryIndex", method: BlackBoxMethod, images: Tensor,
                    top_k: int, labels: Optional[list], approximate: bool) -> Part:
    images = images.to(model_device(method.model) or images.device)
    raw = method.embed(images)
    similarities, rows = index.search(raw, top_k, approximate=approximate)
    count, k = rows.shape
    found = None
    if labels is not None and index.labels is not None:
        found = failed_queries(index, raw, rows, labels)
    needed = [rows.reshape(-1)] + ([] if found is None else [found["wrong"], found["correct"]])
    gallery_rows = torch.unique(torch.cat(needed))  # each gallery image perturbed once

    pool = torch.cat([images, index.gallery_images(gallery_rows.tolist()).to(images)])
    queries = torch.arange(count).repeat_interleave(k)
    groups = [TupleGroup(torch.stack([queries, _places(gallery_rows, rows, count)]),
                         torch.ones(count * k, dtype=torch.bool))]
    if found is not None:
        groups.append(TupleGroup(torch.stack([
            found["queries"], _places(gallery_rows, found["wrong"], count),
            _places(gallery_rows, found["correct"], count)])))
    results = method.run_shared(pool, groups)
    maps = results[0].maps.cpu().reshape(count, k, 2, *results[0].maps.shape[-2:])
    part = {"indices": rows, "similarities": similarities, "query_maps": maps[:, :, 0],
            "gallery_maps": maps[:, :, 1], "scores": results[0].scores.cpu().reshape(count, k, 2)}
    failures = None if found is None else RetrievalFailures(
        **found, maps=results[1].maps.cpu(), scores=results[1].scores.cpu())
    return part, failures


def _explain_embeddings(index: "GalleryIndex", method: BlackBoxMethod, embeddings: Tensor,
                        top_k: int, approximate: bool) -> Part:
    """The matches' maps, each perturbed against the query's embedding held fixed."""
    similarities, rows = index.search(embeddings, top_k, approximate=approximate)
    count, k = rows.shape
    gallery_rows = torch.unique(rows)
    pool = index.gallery_images(gallery_rows.tolist())
    pool = pool.to(model_device(method.model) or pool.device)
    queries = len(gallery_rows) + torch.arange(count).repeat_interleave(k)
    pairs = TupleGroup(torch.stack([queries, _places(gallery_rows, rows, 0)]),
                       torch.ones(count * k, dtype=torch.bool))
    (result,) = method.run_shared(pool, [pairs], partners=embeddings)
    maps = result.maps.cpu().reshape(count, k, 2, *result.maps.shape[-2:])
    scores = result.scores.cpu().reshape(count, k, 2)
    scores[..., 0] = float("nan")  # as from the stored activations: the query has no map
    return {"indices": rows, "similarities": similarities, "gallery_maps": maps[:, :, 1],
            "scores": scores}, None
