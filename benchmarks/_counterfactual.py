"""The model's own counterfactual as a yardstick for the maps of two-object scenes.

* **Occlusion**: paint one object of the scene over with its own background and see how
  much the tuple's cosine criterion drops. The object whose removal lowers it more is
  the one the model depends on; a map *agrees with the model* on a scene when it puts
  more energy on that object.
* **Deletion and insertion** (Petsiuk et al. 2018, RISE): remove the scene's pixels in
  the order of the map, most important first, by painting them with the background, and
  follow the criterion (deletion: the faster it falls, the better the map); or start
  from the background and put the pixels back in that order (insertion: the faster it
  rises, the better). The area under each curve is the mean criterion over evenly spaced
  fractions of the pixels, 0 to 1.

The curves need one backbone pass per step; the heads are linear on the pooled features,
so every head's criterion comes from the same pass, and identical orderings (a
rotation-invariant method under a rotated head) share their passes.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: The default number of points on a deletion or insertion curve (fractions 0 to 1).
STEPS = 16


def criterion_fn(tail: nn.Module, partners: Sequence[Tensor], row: Tensor
                 ) -> Callable[[Tensor], Tensor]:
    """``criterion(scene_activations) -> (n,)``: the scene's part of the tuple's cosine
    criterion, ``sum_j c_0j cos(scene, partner_j)``, with the partners' activations fixed
    (the first ``n`` tuples' partners for ``n`` scenes)."""
    with torch.no_grad():
        units = [F.normalize(tail(a), dim=-1) for a in partners]

    def criterion(scene: Tensor) -> Tensor:
        with torch.no_grad():
            unit = F.normalize(tail(scene), dim=-1)
            count = unit.shape[0]
            return sum(c * (unit * p[:count]).sum(-1) for c, p in zip(row.tolist(), units))

    return criterion


def model_prefers_match(criterion: Callable[[Tensor], Tensor], whole: Tensor,
                        without_match: Tensor, without_distractor: Tensor) -> Tensor:
    """``(B,)`` bool: hiding the match lowers the criterion more than hiding the distractor."""
    full = criterion(whole)
    return (full - criterion(without_match)) > (full - criterion(without_distractor))


def agreement(energy_match: Tensor, energy_distractor: Tensor, prefers_match: Tensor) -> Tensor:
    """``(B,)`` float: 1 where the map favours the object the model depends on more."""
    return ((energy_match > energy_distractor) == prefers_match).float()


def pixel_orders(maps: Tensor, size: int) -> Tensor:
    """``(B, size*size)`` pixel indices, most important first, of maps ``(B, h, w)``
    upsampled bilinearly (ties broken by position, so the order is deterministic)."""
    up = F.interpolate(maps[:, None].float(), size=(size, size), mode="bilinear",
                       align_corners=False).flatten(1)
    return torch.sort(up, dim=1, descending=True, stable=True).indices


def curve_images(scenes: Tensor, backgrounds: Tensor, order: Tensor, steps: int,
                 insertion: bool) -> Tensor:
    """``(steps, B, C, H, W)``: the scenes with the first ``k / (steps - 1)`` of their
    pixels in ``order`` painted with the background (deletion) or, from the background,
    put back (insertion)."""
    batch, _, height, width = scenes.shape
    pixels = height * width
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(pixels).expand(batch, -1))
    frames = []
    for k in range(steps):
        chosen = (rank < round(pixels * k / (steps - 1))).reshape(batch, 1, height, width)
        first, second = (backgrounds, scenes) if insertion else (scenes, backgrounds)
        frames.append(torch.where(chosen, second, first))
    return torch.stack(frames)


def curve_areas(activations: Callable[[Tensor], Tensor], criteria: dict,
                scenes: Tensor, backgrounds: Tensor, maps: Tensor, steps: int = STEPS,
                cache: dict | None = None) -> dict:
    """``{(head, "deletion" | "insertion"): (B,)}`` areas under the curves of ``maps``.

    Args:
        activations: images ``(N, C, H, W)`` -> the explained layer's output (no graph).
        criteria: ``head -> criterion(activations) -> (B,)`` (:func:`criterion_fn`).
        scenes, backgrounds: ``(B, C, H, W)`` in [0, 1].
        maps: ``(B, h, w)``, one per scene.
        cache: the pooled layer outputs of earlier curves by their ordering, shared
            between methods and heads whose maps order the pixels the same way (the
            criteria must only pool the layer output, as the benchmark's heads do).
    """
    order = pixel_orders(maps, scenes.shape[-1])
    out = {}
    for name in ("deletion", "insertion"):
        key = (name, order.numpy().tobytes())
        if cache is None or key not in cache:
            frames = curve_images(scenes, backgrounds, order, steps, name == "insertion")
            # the heads see the pooled features only: keep those, (steps, B, C, 1, 1)
            layer = torch.stack([activations(f).mean(dim=(2, 3), keepdim=True)
                                 for f in frames])
            if cache is not None:
                cache[key] = layer
        layer = cache[key] if cache is not None else layer
        for head, criterion in criteria.items():
            values = torch.stack([criterion(step) for step in layer])  # (steps, B)
            out[head, name] = values.mean(0)
    return out
