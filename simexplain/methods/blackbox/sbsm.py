"""``"sbsm"``: sliding-window occlusion of each image of a tuple, as in similarity-based
saliency maps (Dong, Collins and Hoogs 2019; xaitk-saliency's ``SBSMStack``)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..base import register_method
from .base import BlackBoxMethod
from .masks import SlidingWindows, size_pair

__all__ = ["SBSM"]


class OcclusionDrops:
    """Each window's drop of the criterion, ``s(x) - s(x with the window hidden)``, on the
    grid of window positions."""

    def __init__(self, windows: SlidingWindows, scores: Tensor) -> None:
        self.grid = windows.grid
        self.unperturbed = scores.double()
        self.scores = torch.zeros(len(scores), windows.count, dtype=torch.float64,
                                  device=scores.device)

    def add(self, start: int, masks: Tensor, scores: Tensor) -> None:
        self.scores[:, start:start + scores.shape[1]] = scores

    def maps(self) -> Tensor:
        return (self.unperturbed[:, None] - self.scores).reshape(-1, *self.grid)


@register_method
class SBSM(BlackBoxMethod):
    """Sliding-window occlusion: hide one window of the image at a time, embed it, and map
    how much the image's criterion drops (its partners fixed).

    Args:
        model: any callable ``images -> embeddings`` (see
            :class:`~simexplain.methods.blackbox.BlackBoxMethod`).
        layer: must be ``None``.
        window: the window's side in pixels, or ``(height, width)``; default a quarter of
            the image side.
        stride: the step between window centres in pixels, or ``(height, width)``; default
            half the window. The windows are centred on the cells of a grid of
            ``ceil(H / stride) x ceil(W / stride)`` equal cells.
        **options: ``reference``, ``fill``, ``batch_size``, ``progress``, ``output``,
            ``eval_mode``, as for :class:`~simexplain.methods.blackbox.BlackBoxMethod`.

    Raw maps are on the grid of window positions: cell ``(r, c)`` holds the drop when the
    window centred on it is hidden, so a bilinear upsampling puts each value at its
    window's centre. Cost: one forward pass per window per image, plus one.

    >>> import torch
    >>> embed = lambda x: x[:, :, :2, :2].mean(dim=(2, 3)) + 0.5   # the top-left corner
    >>> x = torch.zeros(2, 1, 3, 4, 4)
    >>> x[:, :, 0, :2, :2] = 1.0                      # both images: a red top-left corner
    >>> maps = SBSM(embed, window=2, stride=2).explain((x[0], x[1]))
    >>> maps.shape, bool((maps[..., 0, 0] > 0).all()), float(maps[..., 1:, :].abs().max())
    (torch.Size([1, 2, 2, 2]), True, 0.0)
    """

    name = "sbsm"

    def __init__(self, model: Any, layer: None = None, *, window: Optional[Any] = None,
                 stride: Optional[Any] = None, **options: Any) -> None:
        super().__init__(model, layer, **options)
        for value, name in ((window, "window"), (stride, "stride")):
            if value is not None:
                size_pair(value, name)
        self.window, self.stride = window, stride
        self.options.update(window=window, stride=stride)

    def perturbations(self, image_size: tuple[int, int]) -> SlidingWindows:
        return SlidingWindows(image_size, self.window, self.stride)

    def accumulator(self, masks: SlidingWindows, scores: Tensor) -> OcclusionDrops:
        return OcclusionDrops(masks, scores)
