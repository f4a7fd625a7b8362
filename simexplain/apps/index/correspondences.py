"""Correspondences of (query, match) pairs from a gallery index's stored values.

A query's location shares are computed once, from the crossing values of its one pass
through the model; each match's from its stored values, by the head alone
(:meth:`~simexplain.methods.PairCorrespondence.shares_from_crossing`).
A model that does not split is run whole on the query and match images.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
from torch import Tensor

from ...methods.correspondence import PairCorrespondence
from ..correspondence import Correspondence, correspondences_of

if TYPE_CHECKING:
    from .gallery_index import GalleryIndex

__all__ = ["correspondence_method", "match_correspondences"]


def correspondence_method(index: "GalleryIndex", options: dict[str, Any]) -> PairCorrespondence:
    """The correspondence of the index's model and layer, measured from the gallery's
    embeddings unless ``options`` give a ``reference``."""
    options = dict(options)
    options.setdefault("reference", index.embeddings)
    options.setdefault("output", index.engine.output)
    return PairCorrespondence(index.model, index.layer.name, **options)


def match_correspondences(
    index: "GalleryIndex", method: PairCorrespondence, images: Tensor,
    crossing: Sequence[Tensor], raw: Tensor, rows: Tensor, block: int,
) -> list[list[Correspondence]]:
    """``(Q, k)`` correspondences of queries ``images`` (their crossing values and raw
    embeddings from one pass) with their matches ``rows`` ``(Q, k)``, ``block`` pairs at a
    time. They keep the query's image; a match's is read on demand."""
    size = (int(images.shape[-2]), int(images.shape[-1]))
    sizes = (size, size)
    mean, std = _normalisation(index)
    count, k = rows.shape
    flat = rows.reshape(-1)
    repeat = torch.arange(count).repeat_interleave(k)
    if index.split is not None:
        queries = method.shares_from_crossing(index.split, index.layer, crossing, size, raw)
    found: list[Correspondence] = []
    for start in range(0, flat.shape[0], block):
        which, matches = repeat[start:start + block], flat[start:start + block]
        if index.split is not None:
            gallery = method.shares_from_crossing(index.split, index.layer,
                                                  index.crossing(matches), size)
            result = method.join(queries[which.to(queries.shares.device)], gallery)
        else:
            device = images.device
            result = method.matrices(images[which.to(device)],
                                     index.gallery_images(matches.tolist()).to(device))
        found += correspondences_of(result, images[which.to(images.device)], None, sizes,
                                    mean, std)
    return [found[q * k:(q + 1) * k] for q in range(count)]


def _normalisation(index: "GalleryIndex") -> tuple[Optional[Sequence[float]], ...]:
    source = index.source
    if source is not None and source.preprocessing is not None:
        return source.preprocessing.mean, source.preprocessing.std
    return None, None
