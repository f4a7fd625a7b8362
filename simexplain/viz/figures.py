"""Figures of explanations, with matplotlib's object API (no pyplot state).

Works in scripts, notebooks and on headless servers: every function returns a
``matplotlib.figure.Figure`` and never opens a window.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional, Protocol, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from .._files import atomic_write

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.image import AxesImage

__all__ = [
    "ExplainedTuples",
    "display_image",
    "draw_overlay",
    "plot_explanation",
    "plot_explanations",
    "plot_retrieval",
    "name_method",
    "save_figure",
]


class ExplainedTuples(Protocol):
    """What a figure of explained tuples reads (an :class:`~simexplain.Explanation` is one)."""

    images: Tensor  # (B, T, C, H, W)
    maps: Tensor  # (B, T, H, W) in [0, 1]
    scores: Tensor  # (B, T)
    labels: Optional[Tensor]  # (B, T) or None
    kind: str
    mean: Optional[Sequence[float]]
    std: Optional[Sequence[float]]

    @property
    def roles(self) -> tuple[str, ...]: ...


def display_image(
    image: Tensor,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> np.ndarray:
    """A ``(C, H, W)`` model input as an ``(H, W, 3)`` array in [0, 1] for ``imshow``.

    The model's normalisation is undone with ``mean``/``std`` when known; otherwise the
    image is min-max scaled.
    """
    image = image.detach().float().cpu()
    if mean is not None and std is not None and len(mean) == image.shape[0]:
        image = image * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    else:
        low, high = image.min(), image.max()
        image = (image - low) / (high - low).clamp_min(1e-12)
    image = image.clamp(0, 1)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return image[:3].permute(1, 2, 0).numpy()


def draw_overlay(
    ax: "Axes",
    image: Tensor,
    heat_map: Optional[Tensor] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    cmap: str = "jet",
    alpha: float = 0.5,
    title: Optional[str] = None,
) -> Optional["AxesImage"]:
    """Draw ``image`` (``(C, H, W)``) on ``ax`` with ``heat_map`` (``(H, W)``, in [0, 1]) over it.

    Returns the map's ``AxesImage`` (for a colorbar), or ``None`` without a map.
    """
    ax.set_axis_off()
    ax.imshow(display_image(image, mean, std))
    mappable = None
    if heat_map is not None:
        heat = heat_map.detach().float().cpu().numpy()
        mappable = ax.imshow(heat, cmap=cmap, alpha=alpha, vmin=0, vmax=1)
    if title is not None:
        ax.set_title(title, fontsize=9)
    return mappable


def _slot_title(exp: ExplainedTuples, index: int, slot: int) -> str:
    role = exp.roles[slot]
    if exp.labels is not None:
        role = f"{role} (label {int(exp.labels[index, slot])})"
    return f"{role}\ns = {float(exp.scores[index, slot]):.3g}"


def _draw_rows(
    figure: Figure,
    rows: list[tuple[ExplainedTuples, int, Optional[str]]],
    cmap: str,
    alpha: float,
) -> None:
    columns = max(e.images.shape[1] for e, _, _ in rows)
    panels = figure.subfigures(len(rows), 1, squeeze=False)[:, 0]
    for panel, (exp, index, row_title) in zip(panels, rows):
        axes = panel.subplots(1, columns, squeeze=False)[0]
        mappable = None
        for t, ax in enumerate(axes):
            ax.set_axis_off()
            if t >= exp.images.shape[1]:
                continue
            mappable = draw_overlay(
                ax,
                exp.images[index, t],
                exp.maps[index, t],
                exp.mean,
                exp.std,
                cmap,
                alpha,
                _slot_title(exp, index, t),
            )
        if row_title:
            panel.suptitle(row_title, fontsize=10, x=0.02, ha="left")
        method = getattr(exp, "method", None)  # which method made the maps, where known
        panel.colorbar(mappable, ax=list(axes), shrink=0.8, label=_map_label(method))


def _map_label(method: Optional[str]) -> str:
    return f"attention ({method})" if method else "attention"


def name_method(figure: Figure, method: str) -> Figure:
    """Title ``figure`` with the explanation method that made its maps (``figure``)."""
    figure.suptitle(f"maps: {method}", fontsize=10, x=0.99, ha="right")
    return figure


def plot_explanation(
    explanation: ExplainedTuples,
    indices: Optional[Sequence[int]] = None,
    cmap: str = "jet",
    alpha: float = 0.5,
) -> Figure:
    """One row per tuple of ``explanation`` (or of the tuples in ``indices``)."""
    indices = range(explanation.images.shape[0]) if indices is None else indices
    rows = [(explanation, i, None) for i in indices]
    return plot_explanations([explanation], rows=rows, cmap=cmap, alpha=alpha)


def plot_explanations(
    explanations: Sequence[ExplainedTuples],
    titles: Optional[Sequence[str]] = None,
    cmap: str = "jet",
    alpha: float = 0.5,
    rows: Optional[list] = None,
) -> Figure:
    """One figure with a row per tuple of every explanation, titled by kind (or ``titles``);
    the figure's title names the method that made the maps, where all share one."""
    if rows is None:
        rows = []
        for k, exp in enumerate(explanations):
            for i in range(exp.images.shape[0]):
                label = titles[k] if titles is not None else exp.kind.replace("_", " ")
                rows.append((exp, i, label))
    if not rows:
        raise ValueError("nothing to plot: no explanations given")
    columns = max(e.images.shape[1] for e, _, _ in rows)
    figure = Figure(figsize=(2.6 * columns + 1.0, 2.9 * len(rows)), layout="constrained")
    _draw_rows(figure, rows, cmap, alpha)
    methods = {getattr(exp, "method", None) for exp, _, _ in rows}
    if len(methods) == 1 and None not in methods:
        name_method(figure, methods.pop())
    return figure


def plot_retrieval(
    query_image: Tensor,
    gallery_images: Tensor,
    query_maps: Optional[Tensor],
    gallery_maps: Tensor,
    scores: Tensor,
    *,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    gallery_titles: Optional[Sequence[str]] = None,
    query_title: str = "query",
    score_name: str = "cos",
    cmap: str = "jet",
    alpha: float = 0.5,
    method: Optional[str] = None,
) -> Figure:
    """A query and its top-k gallery matches, each match with its map.

    The first column shows the query. With ``query_maps``, the top row shows the
    query's map for each match (what in the query resembles that match) above the
    match and its own map; without, one row holds the query and the matches.

    Args:
        query_image: ``(C, H, W)``.
        gallery_images: ``(k, C, H, W)``, best match first.
        query_maps: ``(k, H, W)`` one query map per match, ``(H, W)`` one for all,
            or ``None``.
        gallery_maps: ``(k, H, W)`` in [0, 1].
        scores: ``(k,)`` the similarity of each match, shown in its title.
        mean, std: the normalisation to undo for display.
        gallery_titles: a name per match (e.g. its file name).
        query_title: the query's title.
        score_name: how the score is labelled in titles.
        method: the explanation method that made the maps, named in the figure's title
            and on its colour bar.

    Example:
        >>> figure = plot_retrieval(
        ...     torch.rand(3, 8, 8), torch.rand(2, 3, 8, 8), torch.rand(2, 8, 8),
        ...     torch.rand(2, 8, 8), torch.tensor([0.9, 0.7]),
        ... )
        >>> [ax.get_title() for ax in figure.axes[:3]]
        ['query', 'query vs #1', 'query vs #2']
    """
    count = gallery_images.shape[0]
    if gallery_images.dim() != 4 or gallery_maps.shape[0] != count or len(scores) != count:
        raise ValueError(
            f"gallery_images {tuple(gallery_images.shape)}, gallery_maps "
            f"{tuple(gallery_maps.shape)} and scores ({len(scores)},) must hold the same "
            "number k of matches: (k, C, H, W), (k, H, W), (k,)"
        )
    if count == 0:
        raise ValueError("nothing to plot: no gallery matches given")
    if gallery_titles is not None and len(gallery_titles) != count:
        raise ValueError(f"{len(gallery_titles)} gallery_titles for {count} matches")
    if query_maps is not None and query_maps.dim() == 2:
        query_maps = query_maps.expand(count, -1, -1)
    rows = 1 if query_maps is None else 2
    figure = Figure(figsize=(2.3 * (count + 1) + 1.0, 2.6 * rows), layout="constrained")
    axes = figure.subplots(rows, count + 1, squeeze=False)
    draw_overlay(axes[0, 0], query_image, mean=mean, std=std, title=query_title)
    mappable = None
    for j in range(count):
        if query_maps is not None:
            draw_overlay(
                axes[0, j + 1], query_image, query_maps[j], mean, std, cmap, alpha,
                f"{query_title} vs #{j + 1}",
            )  # fmt: skip
        name = f" {gallery_titles[j]}" if gallery_titles is not None else ""
        mappable = draw_overlay(
            axes[-1, j + 1], gallery_images[j], gallery_maps[j], mean, std, cmap, alpha,
            f"#{j + 1}{name}\n{score_name} = {float(scores[j]):.3f}",
        )  # fmt: skip
    if rows == 2:
        axes[1, 0].set_axis_off()
    figure.colorbar(mappable, ax=list(axes.ravel()), shrink=0.8, label=_map_label(method))
    return figure if method is None else name_method(figure, method)


def save_figure(figure: Figure, path: "str | os.PathLike[str]", dpi: int = 150) -> str:
    """Write ``figure`` to ``path`` atomically: a temporary file, then a rename.

    The format follows the file's extension (``.png``, ``.pdf``, ``.svg``, ...); a missing
    folder is created.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    file_format = (os.path.splitext(path)[1] or ".png").lstrip(".").lower()
    atomic_write(path, lambda handle: figure.savefig(handle, dpi=dpi, format=file_format))
    return path
