"""The discriminative benchmark's figure: one scene against a view of each of its objects."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from torch import nn

from simexplain.data import PhotoScenes


def legible_scene(scenes: PhotoScenes, contrast: float = 0.2) -> int:
    """The first scene whose two objects both stand out from their background (mean
    absolute difference over their masks at least ``contrast``): the figure's scene."""
    for index in range(scenes.images.shape[0]):
        difference = (scenes.images[index] - scenes.backgrounds[index]).abs().mean(0)
        masks = scenes.masks[index]
        if all(float(difference[m].mean()) >= contrast for m in masks if m.any()):
            return index
    return 0


def figure_of_scene(methods: dict, tuples_for: Callable, tail: nn.Module, drawn: dict,
                    acts: dict, context: dict, targets: list[Path]) -> None:
    """One scene (:func:`legible_scene`) against a view of each of its objects, a row per
    method; the solid box is the object that matches the query, the dashed one the other."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from simexplain.engine import image_maps
    from simexplain.viz import draw_overlay, save_figure

    index = legible_scene(drawn["scenes"])
    names = list(methods)
    figure = Figure(figsize=(8.6, 2.0 * len(names) + 0.4), layout="constrained")
    axes = figure.subplots(len(names), 4, squeeze=False)
    scene = drawn["scenes"].images[index]
    boxes = drawn["scenes"].boxes[index].tolist()
    for row, name in enumerate(names):
        for side in (0, 1):
            tuples = [t[index : index + 1] for t in tuples_for("pair", side, acts)]
            maps = methods[name](tail, tuples, context)[:, 0]
            query = drawn["views"][side].images[index]
            draw_overlay(axes[row, 2 * side], query, title=f"query {side + 1}" if row == 0
                         else None)
            ax = axes[row, 2 * side + 1]
            draw_overlay(ax, scene, image_maps(maps, scene.shape[-2:])[0],
                         title=f"scene vs query {side + 1}" if row == 0 else None)
            for j, (x1, y1, x2, y2) in enumerate(boxes):
                ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="white",
                                       linewidth=1.2, linestyle="-" if j == side else "--"))
        axes[row, 0].text(-0.15, 0.5, name, transform=axes[row, 0].transAxes, rotation=90,
                          va="center", ha="right", fontsize=10)
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        save_figure(figure, target, dpi=70)
