"""The figure of a correspondence: two images side by side, joined where they match."""

from __future__ import annotations

from typing import Optional, Protocol, Sequence

from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import ConnectionPatch
from torch import Tensor

from .figures import display_image

__all__ = ["MatchedPair", "plot_correspondence"]


class MatchedPair(Protocol):
    """What the figure reads (a :class:`~simexplain.Correspondence` is one)."""

    image1: Optional[Tensor]
    image2: Optional[Tensor]
    score: float
    exact: bool
    mean: Optional[Sequence[float]]
    std: Optional[Sequence[float]]

    def matches(self, n: int = 20) -> tuple[Tensor, Tensor, Tensor]: ...


def plot_correspondence(pair: MatchedPair, n: int = 20, cmap: str = "viridis") -> Figure:
    """``pair``'s images side by side with a line for each of its ``n`` strongest
    matches, coloured by the match's share of the score (strongest drawn on top).

    >>> import torch
    >>> from simexplain.apps.correspondence import Correspondence
    >>> pair = Correspondence(torch.rand(16, 16), 0.5, ((4, 4), (4, 4)), ((32, 32), (32, 32)),
    ...                       True, torch.rand(3, 32, 32), torch.rand(3, 32, 32))
    >>> len(plot_correspondence(pair, n=5).axes)   # two images and a colour bar
    3
    """
    assert pair.image1 is not None and pair.image2 is not None
    points1, points2, scores = pair.matches(n)
    figure = Figure(figsize=(8.4, 4.0), layout="constrained")
    axes = figure.subplots(1, 2)
    for ax, image, title in ((axes[0], pair.image1, "image 1"), (axes[1], pair.image2, "image 2")):
        ax.imshow(display_image(image, pair.mean, pair.std))
        ax.set_axis_off()
        ax.set_title(title, fontsize=9)
    values = scores.float()
    norm = Normalize(vmin=float(values.min()), vmax=float(values.max()) + 1e-12)
    colours = colormaps[cmap]
    for k in reversed(range(values.shape[0])):  # strongest last, so on top
        (y1, x1), (y2, x2) = points1[k].tolist(), points2[k].tolist()
        colour = colours(norm(float(values[k])))
        line = ConnectionPatch(xyA=(x1, y1), coordsA=axes[0].transData, xyB=(x2, y2),
                               coordsB=axes[1].transData, color=colour, linewidth=1.4,
                               alpha=0.9)
        figure.add_artist(line)
        axes[0].plot(x1, y1, "o", color=colour, markersize=4)
        axes[1].plot(x2, y2, "o", color=colour, markersize=4)
    figure.colorbar(ScalarMappable(norm, colours), ax=list(axes), shrink=0.8,
                    label="share of the score")
    kind = "exact" if pair.exact else "estimate"
    figure.suptitle(f"{values.shape[0]} strongest matches; similarity {pair.score:.3f} "
                    f"({kind})", fontsize=10)
    return figure
