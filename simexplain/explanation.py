"""The :class:`Explanation` that :func:`simexplain.explain` returns."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

from matplotlib.figure import Figure
from torch import Tensor

from .viz import plot_explanation, save_figure

__all__ = ["Explanation", "ROLES"]

#: Names of the tuple slots, by kind.
ROLES: dict[str, tuple[str, ...]] = {
    "same_pair": ("image 1", "image 2"),
    "different_pair": ("image 1", "image 2"),
    "pair": ("image 1", "image 2"),
    "triplet": ("anchor", "positive", "negative"),
    "quadruplet": ("anchor", "positive", "negative 1", "negative 2"),
}


@dataclass
class Explanation:
    """Maps, scores and weights for ``B`` tuples of ``T`` images.

    Attributes:
        images: ``(B, T, C, H, W)`` the model inputs.
        kind: ``"same_pair"``, ``"different_pair"``, ``"pair"`` (a mix of both),
            ``"triplet"``, ``"quadruplet"`` or ``"custom"``.
        raw_maps: ``(B, T, h, w)`` maps at the layer's resolution.
        maps: ``(B, T, H, W)`` maps upsampled to the images and scaled to [0, 1].
        scores: ``(B, T)`` each image's score ``s_i = w . f_i``.
        weights: ``(B, d)`` the weight vector ``w`` of each tuple.
        embeddings: ``(B, T, d)`` L2-normalised embeddings.
        labels: ``(B, T)`` the labels given, if any.
        layer: the name of the layer explained.
        mean, std: the normalisation of ``images``, used to display them.
    """

    images: Tensor
    kind: str
    raw_maps: Tensor
    maps: Tensor
    scores: Tensor
    weights: Tensor
    embeddings: Tensor
    labels: Optional[Tensor] = None
    layer: str = ""
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None

    @property
    def roles(self) -> tuple[str, ...]:
        """The role of each slot: ``("anchor", "positive", "negative")`` for triplets."""
        count = self.images.shape[1]
        return ROLES.get(self.kind, tuple(f"image {i + 1}" for i in range(count)))[:count]

    def plot(
        self, indices: Optional[Sequence[int]] = None, cmap: str = "jet", alpha: float = 0.5
    ) -> Figure:
        """A figure with one row per tuple: each image, its map overlaid, role and score."""
        return plot_explanation(self, indices=indices, cmap=cmap, alpha=alpha)

    def save(self, path: "str | os.PathLike[str]", dpi: int = 150) -> str:
        """Write :meth:`plot` to ``path`` atomically (format from the extension)."""
        return save_figure(self.plot(), path, dpi=dpi)

    def __repr__(self) -> str:
        batch, count = self.images.shape[:2]
        return (
            f"Explanation(kind={self.kind!r}, tuples={batch}, images_per_tuple={count}, "
            f"layer={self.layer!r}, scores={self.scores.tolist()})"
        )
