"""What explaining queries against a gallery index returns."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

from torch import Tensor

from ...engine.maps import image_maps
from ...errors import InputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..correspondence import Correspondence
    from .gallery_index import GalleryIndex

__all__ = ["RetrievalResult", "RetrievalFailures"]


@dataclass
class RetrievalFailures:
    """Queries whose top match has another label, each explained as the triplet the
    model decided: the query as anchor, the wrong top match in the positive's role, the
    best-ranked correct match in the negative's. The query's map shows what in it is
    closer to the wrong match than to the correct one; the wrong match's, what in it
    resembles the query; the correct match's, what in it sets it apart.

    Attributes:
        queries: ``(F,)`` positions of the failed queries among the queries.
        correct: ``(F,)`` gallery rows of the best-ranked match with the query's label.
        wrong: ``(F,)`` gallery rows of the wrong top match.
        correct_rank: ``(F,)`` the correct match's rank (0 is the top).
        similarities: ``(F, 2)`` the query's similarity to the correct and the wrong one.
        maps: ``(F, 3, h, w)`` raw maps of the query, the wrong and the correct match.
        scores: ``(F, 3)`` each image's score, in the same order.
    """

    queries: Tensor
    correct: Tensor
    wrong: Tensor
    correct_rank: Tensor
    similarities: Tensor
    maps: Tensor
    scores: Tensor

    def __len__(self) -> int:
        return int(self.queries.shape[0])


@dataclass
class RetrievalResult:
    """Queries, their top ``k`` gallery matches, and the maps of every (query, match) pair:
    what :meth:`GalleryIndex.explain <simexplain.GalleryIndex.explain>` and
    :func:`~simexplain.explain_matches` return.

    Attributes:
        indices: ``(Q, k)`` gallery rows of the matches, best first.
        similarities: ``(Q, k)`` cosine similarity of each match to its query.
        query_maps: ``(Q, k, h, w)`` raw maps of each query for each of its matches, at
            the layer's resolution (``None`` for queries given as embeddings).
        gallery_maps: ``(Q, k, h, w)`` raw maps of each match.
        scores: ``(Q, k, 2)`` the query's and the match's score.
        method: the method that made the maps.
        layer: the layer explained.
        failures: the failed queries explained, when labels were given on both sides.
        query_images: ``(Q, C, H, W)`` the queries as the model saw it, or ``None``.
        index: the gallery index searched (names, labels, images), or ``None``.
        match_images: ``(Q, k, C, H, W)`` the matches, when there is no index to read
            them from.
        names: a name per match of each query, when there is no index to name them.
        mean, std: the images' normalisation, undone for display (default: the index's).
        correspondences: with ``correspondence=True``, ``[Q][k]``: which locations of
            each query match which of each match (:meth:`correspondence` adds the
            match's image for plotting).
    """

    indices: Tensor
    similarities: Tensor
    query_maps: Optional[Tensor]
    gallery_maps: Tensor
    scores: Tensor
    method: str
    layer: str
    failures: Optional[RetrievalFailures] = None
    query_images: Optional[Tensor] = None
    index: Optional["GalleryIndex"] = None
    match_images: Optional[Tensor] = None
    names: Optional[list[list[str]]] = None
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None
    correspondences: Optional[list[list["Correspondence"]]] = None

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def image_size(self) -> tuple[int, int]:
        """The input images' ``(H, W)``."""
        for images in (self.query_images, self.match_images):
            if images is not None:
                return int(images.shape[-2]), int(images.shape[-1])
        if self.index is None:
            raise InputError("the result has no images nor index to size its maps by")
        shape = self.index.manifest["image_shape"]
        return int(shape[-2]), int(shape[-1])

    def image_maps(self, query: int) -> tuple[Optional[Tensor], Tensor]:
        """Query ``query``'s maps ``(k, H, W)`` and its matches' maps, upsampled to the
        images and scaled to [0, 1] each."""
        size = self.image_size()
        query_maps = None if self.query_maps is None else image_maps(self.query_maps[query], size)
        return query_maps, image_maps(self.gallery_maps[query], size)

    def match_names(self, query: int) -> list[str]:
        """The names of query ``query``'s matches (file paths, or gallery rows)."""
        if self.names is not None:
            return list(self.names[query])
        if self.index is not None:
            return [self.index.names[int(row)] for row in self.indices[query]]
        return [f"#{int(row)}" for row in self.indices[query]]

    def matches(self, query: int) -> Tensor:
        """Query ``query``'s matched images ``(k, C, H, W)``."""
        if self.match_images is not None:
            return self.match_images[query]
        if self.index is None:
            raise InputError("the result has neither the matches' images nor an index")
        return self.index.gallery_images(self.indices[query].tolist())

    def plot(self, query: int = 0, query_title: str = "query", cmap: str = "jet",
             alpha: float = 0.5) -> "Figure":
        """Query ``query`` and its matches with their maps
        (:func:`~simexplain.viz.plot_retrieval`); needs the query and gallery images."""
        from ...viz.figures import plot_retrieval

        if self.query_images is None:
            raise InputError("queries given as embeddings have no image to plot")
        query_maps, gallery_maps = self.image_maps(query)
        mean, std = self.mean, self.std
        source = self.index.source if self.index is not None else None
        if mean is None and source is not None and source.preprocessing is not None:
            mean, std = source.preprocessing.mean, source.preprocessing.std
        names = [_short(n) for n in self.match_names(query)] if self.names is not None or \
            self.index is not None else None
        return plot_retrieval(
            self.query_images[query], self.matches(query), query_maps, gallery_maps,
            self.similarities[query], mean=mean, std=std, gallery_titles=names,
            query_title=query_title, cmap=cmap, alpha=alpha, method=self.method,
        )

    def correspondence(self, query: int, match: int) -> "Correspondence":
        """Which locations of query ``query`` match which of its ``match``-th match, with
        both images (for :meth:`~simexplain.Correspondence.plot`)."""
        if self.correspondences is None:
            raise InputError("the result has no correspondences; explain with "
                             "correspondence=True")
        found = self.correspondences[query][match]
        if found.image2 is None:
            found = dataclasses.replace(found, image2=self.matches(query)[match])
        return found

    def to_dict(self, query: int) -> dict[str, Any]:
        """Query ``query``'s matches as plain data (names, similarities, labels)."""
        labels = self.index.labels if self.index is not None else None
        rows = [int(r) for r in self.indices[query]]
        return {
            "matches": self.match_names(query),
            "similarities": [round(float(s), 6) for s in self.similarities[query]],
            "labels": None if labels is None else [labels[r] for r in rows],
        }


def _short(name: str) -> str:
    return name.replace("\\", "/").rsplit("/", 1)[-1]

