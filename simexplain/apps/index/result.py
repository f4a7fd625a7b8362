"""What explaining queries against a gallery index returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from torch import Tensor

from ...engine.maps import image_maps

if TYPE_CHECKING:
    from matplotlib.figure import Figure

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
    """Queries, their top ``k`` gallery matches, and the maps of every (query, match) pair.

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
        query_images: ``(Q, C, H, W)`` the queries as the model saw them, or ``None``.
        index: the gallery index searched (names, labels, images).
    """

    indices: Tensor
    similarities: Tensor
    query_maps: Optional[Tensor]
    gallery_maps: Tensor
    scores: Tensor
    method: str
    layer: str
    failures: Optional[RetrievalFailures]
    query_images: Optional[Tensor]
    index: "GalleryIndex"

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def image_maps(self, query: int) -> tuple[Optional[Tensor], Tensor]:
        """Query ``query``'s maps ``(k, H, W)`` and its matches' maps, upsampled to the
        images and scaled to [0, 1] each."""
        size = tuple(self.index.manifest["image_shape"][-2:])
        query_maps = None if self.query_maps is None else image_maps(self.query_maps[query], size)
        return query_maps, image_maps(self.gallery_maps[query], size)

    def match_names(self, query: int) -> list[str]:
        """The names of query ``query``'s matches (file paths, or gallery rows)."""
        return [self.index.names[int(row)] for row in self.indices[query]]

    def plot(self, query: int = 0, query_title: str = "query", cmap: str = "jet",
             alpha: float = 0.5) -> "Figure":
        """Query ``query`` and its matches with their maps
        (:func:`~simexplain.viz.plot_retrieval`); needs the query and gallery images."""
        from ...errors import InputError
        from ...viz.figures import plot_retrieval

        if self.query_images is None:
            raise InputError("queries given as embeddings have no image to plot")
        query_maps, gallery_maps = self.image_maps(query)
        preprocessing = self.index.source.preprocessing if self.index.source else None
        return plot_retrieval(
            self.query_images[query], self.index.gallery_images(self.indices[query].tolist()),
            query_maps, gallery_maps, self.similarities[query],
            mean=preprocessing.mean if preprocessing else None,
            std=preprocessing.std if preprocessing else None,
            gallery_titles=[_short(n) for n in self.match_names(query)],
            query_title=query_title, cmap=cmap, alpha=alpha, method=self.method,
        )

    def to_dict(self, query: int) -> dict[str, Any]:
        """Query ``query``'s matches as plain data (names, similarities, labels)."""
        labels = self.index.labels
        rows = [int(r) for r in self.indices[query]]
        return {
            "matches": [self.index.names[r] for r in rows],
            "similarities": [round(float(s), 6) for s in self.similarities[query]],
            "labels": None if labels is None else [labels[r] for r in rows],
        }


def _short(name: str) -> str:
    return name.replace("\\", "/").rsplit("/", 1)[-1]

