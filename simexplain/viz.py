"""Figures of explanations, with matplotlib's object API (no pyplot state).

Works in scripts, notebooks and on headless servers: every function returns a
``matplotlib.figure.Figure`` and never opens a window.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from .files import atomic_write

if TYPE_CHECKING:
    from .explanation import Explanation

__all__ = ["display_image", "plot_explanation", "plot_explanations", "save_figure"]


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


def _draw_rows(
    figure: Figure,
    rows: list[tuple["Explanation", int, Optional[str]]],
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
            ax.imshow(display_image(exp.images[index, t], exp.mean, exp.std))
            mappable = ax.imshow(
                exp.maps[index, t].detach().cpu().numpy(), cmap=cmap, alpha=alpha, vmin=0, vmax=1
            )
            ax.set_title(f"{exp.roles[t]}\ns = {float(exp.scores[index, t]):.3g}", fontsize=9)
        if row_title:
            panel.suptitle(row_title, fontsize=10, x=0.02, ha="left")
        panel.colorbar(mappable, ax=list(axes), shrink=0.8, label="attention")


def plot_explanation(
    explanation: "Explanation",
    indices: Optional[Sequence[int]] = None,
    cmap: str = "jet",
    alpha: float = 0.5,
) -> Figure:
    """One row per tuple of ``explanation`` (or of the tuples in ``indices``)."""
    indices = range(explanation.images.shape[0]) if indices is None else indices
    rows = [(explanation, i, None) for i in indices]
    return plot_explanations([explanation], rows=rows, cmap=cmap, alpha=alpha)


def plot_explanations(
    explanations: Sequence["Explanation"],
    titles: Optional[Sequence[str]] = None,
    cmap: str = "jet",
    alpha: float = 0.5,
    rows: Optional[list] = None,
) -> Figure:
    """One figure with a row per tuple of every explanation, titled by kind (or ``titles``)."""
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
    return figure


def save_figure(figure: Figure, path: "str | os.PathLike[str]", dpi: int = 150) -> str:
    """Write ``figure`` to ``path`` atomically: a temporary file, then a rename.

    The format follows the file's extension (``.png``, ``.pdf``, ``.svg``, ...).
    """
    path = os.fspath(path)
    file_format = (os.path.splitext(path)[1] or ".png").lstrip(".").lower()
    atomic_write(path, lambda handle: figure.savefig(handle, dpi=dpi, format=file_format))
    return path
