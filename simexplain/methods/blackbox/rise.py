"""``"rise"``: random masks (Petsiuk et al. 2018) for similarity, as SANE (Plummer et al.
2020) and Distance Explainer (Meijer and Bos 2025) use them."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..base import register_method
from .base import BlackBoxMethod
from .masks import RandomMasks

__all__ = ["RISE"]


class KeptMinusHidden:
    """Per pixel, the mean score of the perturbations that keep it minus the mean score of
    those that hide it, each mask weighted by how much it keeps (hides) the pixel."""

    def __init__(self, masks: RandomMasks, scores: Tensor) -> None:
        pixels = masks.image_size[0] * masks.image_size[1]
        self.image_size = masks.image_size
        self.count = masks.count
        options = dict(dtype=torch.float64, device=scores.device)
        self.kept = torch.zeros(pixels, **options)              # sum_k m_k
        self.score_sum = torch.zeros(len(scores), **options)    # sum_k s_k
        self.weighted = torch.zeros(len(scores), pixels, **options)  # sum_k s_k m_k

    def add(self, start: int, masks: Tensor, scores: Tensor) -> None:
        flat = masks.flatten(1).double()
        self.kept += flat.sum(0)
        self.score_sum += scores.double().sum(1)
        self.weighted += scores.double() @ flat

    def maps(self) -> Tensor:
        hidden = self.count - self.kept
        when_kept = self.weighted / self.kept.clamp_min(1e-12)
        when_hidden = (self.score_sum[:, None] - self.weighted) / hidden.clamp_min(1e-12)
        # a pixel never hidden (or never kept) tells nothing
        known = (self.kept > 1e-12) & (hidden > 1e-12)
        return torch.where(known, when_kept - when_hidden, 0.0).reshape(-1, *self.image_size)


@register_method
class RISE(BlackBoxMethod):
    """Random masks: embed the image under many random smooth masks and map, per pixel, how
    much higher the criterion is when the pixel is kept than when it is hidden (partners
    fixed).

    Args:
        model: any callable ``images -> embeddings`` (see
            :class:`~simexplain.methods.blackbox.BlackBoxMethod`).
        layer: must be ``None``.
        n_masks: the number of masks, forward passes per image (RISE used 4,000 to 8,000
            for classifiers, SANE 2,000, Distance Explainer about 1,000).
        grid: cells per side of the masks' random grid ``s``, or ``(s_h, s_w)``; RISE's 7.
        p: the probability that a grid cell is kept; RISE's 0.5.
        seed: the masks' seed: the same seed gives the same masks, so the same maps.
        **options: ``reference``, ``fill``, ``batch_size``, ``progress``, ``output``,
            ``eval_mode``, as for :class:`~simexplain.methods.blackbox.BlackBoxMethod`.

    Raw maps are at the input's resolution: the masks are shifted by random fractions of
    a cell, so no coarser grid holds them. Cost: ``n_masks`` forward passes per image,
    plus one.

    >>> import torch
    >>> embed = lambda x: x[:, :, :4, :4].mean(dim=(2, 3)) + 0.5   # the top-left quadrant
    >>> x = torch.zeros(2, 1, 3, 8, 8)
    >>> x[:, :, 0, :4, :4] = 1.0                      # both images: a red top-left quadrant
    >>> maps = RISE(embed, n_masks=200, grid=2).explain((x[0], x[1]))
    >>> maps.shape, bool(maps[..., :4, :4].mean() > 5 * maps[..., 4:, 4:].mean())
    (torch.Size([1, 2, 8, 8]), True)
    """

    name = "rise"

    def __init__(self, model: Any, layer: None = None, *, n_masks: int = 1000, grid: Any = 7,
                 p: float = 0.5, seed: int = 0, **options: Any) -> None:
        super().__init__(model, layer, **options)
        self.n_masks, self.grid, self.p, self.seed = n_masks, grid, p, seed
        RandomMasks.check(n_masks, grid, p, seed)
        self.options.update(n_masks=n_masks, grid=grid, p=p, seed=seed)

    def perturbations(self, image_size: tuple[int, int]) -> RandomMasks:
        return RandomMasks(image_size, self.n_masks, self.grid, self.p, self.seed)

    def accumulator(self, masks: RandomMasks, scores: Tensor) -> KeptMinusHidden:
        return KeptMinusHidden(masks, scores)
