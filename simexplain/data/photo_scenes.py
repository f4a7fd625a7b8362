"""Scenes built from real photographs: several objects pasted on photographic clutter.

A discriminative test of similarity maps needs scenes that hold more than one object,
so that "on the object" is not enough: the map of a scene paired with a view of one of
its objects must light up that object and not the other. :func:`compose_scenes` pastes
photographed objects (bright on a dark ground, as Fashion-MNIST's items are) into the
cells of a 2 x 2 grid over photographic clutter;
:func:`compose_views` renders single objects the same way, as the partners ("another
view": another photo of the class, rescaled, moved and possibly mirrored).

A scene's objects share one random tint (and each view has its own), so colour carries
no class information and cannot tell a scene's objects apart; each object's visible mask
and box are returned as ground truth. The background is a random crop
of one of the ``clutter`` photos (scenes without any of the objects' classes: streets,
textures, animals), dimmed; without them, a plain smooth field.

>>> import torch
>>> photos = torch.zeros(6, 1, 28, 28)
>>> photos[:, :, 6:22, 8:20] = 1.0                 # a bright item on a dark ground
>>> scenes = compose_scenes(photos, torch.arange(6), 3, image_size=64, seed=0)
>>> tuple(scenes.images.shape), tuple(scenes.boxes.shape)
((3, 3, 64, 64), (3, 2, 4))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .scenes import Scenes, masks_to_boxes

__all__ = ["PhotoScenes", "compose_scenes", "compose_views"]

# An object pixel is opaque from this intensity of its photo on (soft below it).
_ALPHA_FULL = 0.3
_ALPHA_START = 0.05


@dataclass
class PhotoScenes(Scenes):
    """:class:`~simexplain.data.Scenes` composed from photographed objects: ``colours``
    holds each object's tint, ``sources`` ``(N, K)`` the index of its photo, and
    ``backgrounds`` ``(N, 3, S, S)`` the images before any object was pasted (to hide an
    object, put its pixels back: occlusion tests)."""

    sources: Tensor
    backgrounds: Tensor


def _check(objects: Tensor, labels: Tensor, image_size: int) -> tuple[Tensor, Tensor]:
    if objects.dim() != 4 or objects.shape[1] not in (1, 3):
        raise ValueError(f"objects must be (M, 1 or 3, h, w) photos, got {tuple(objects.shape)}")
    labels = torch.as_tensor(labels).reshape(-1).long()
    if labels.shape[0] != objects.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {objects.shape[0]} object photos")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    return objects.float(), labels


def _background(
    n: int, size: int, clutter: Optional[Sequence[Tensor]], g: torch.Generator
) -> Tensor:
    """``(n, 3, S, S)`` backgrounds: crops of ``clutter`` photos, or plain smooth fields."""
    if clutter is None:
        base = 0.2 + 0.3 * torch.rand(n, 3, 1, 1, generator=g)
        field = 0.15 * (torch.rand(n, 1, 3, 3, generator=g) - 0.5)
        images = base + F.interpolate(field, size=(size, size), mode="bilinear",
                                      align_corners=False)
        return (images + 0.04 * (torch.rand(n, 1, size, size, generator=g) - 0.5)).clamp(0, 1)
    images = torch.empty(n, 3, size, size)
    for i in range(n):
        photo = clutter[int(torch.randint(len(clutter), (1,), generator=g))].float()
        photo = photo.expand(3, -1, -1) if photo.shape[0] == 1 else photo[:3]
        h, w = photo.shape[-2:]
        side = max(8, int(min(h, w) * (0.3 + 0.5 * float(torch.rand(1, generator=g)))))
        top = int(torch.randint(h - side + 1, (1,), generator=g))
        left = int(torch.randint(w - side + 1, (1,), generator=g))
        crop = photo[None, :, top : top + side, left : left + side]
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False,
                             antialias=True)[0]
        if bool(torch.rand(1, generator=g) < 0.5):
            crop = crop.flip(-1)
        images[i] = 0.1 + 0.7 * crop.clamp(0, 1)
    noise = 0.04 * (torch.rand(n, 1, size, size, generator=g) - 0.5)
    return (images + noise).clamp(0, 1)


def _tints(n: int, g: torch.Generator) -> Tensor:
    return 0.55 + 0.45 * torch.rand(n, 3, 1, 1, generator=g)


def _paste(
    canvas: Tensor,
    photos: Tensor,
    centres: Tensor,
    sizes: Tensor,
    flips: Tensor,
    tints: Tensor,
) -> Tensor:
    """Paste one tinted photo per image of ``canvas`` (in place); return their masks."""
    n, _, size, _ = canvas.shape
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    grey = photos.mean(1, keepdim=True)
    for i in range(n):
        side = int(sizes[i])
        item = F.interpolate(grey[i : i + 1], size=(side, side), mode="bilinear",
                             align_corners=False, antialias=True)[0].clamp(0, 1)
        if bool(flips[i]):
            item = item.flip(-1)
        alpha = ((item - _ALPHA_START) / (_ALPHA_FULL - _ALPHA_START)).clamp(0, 1)
        y0 = int(centres[i, 0]) - side // 2
        x0 = int(centres[i, 1]) - side // 2
        region = canvas[i, :, y0 : y0 + side, x0 : x0 + side]
        colour = (0.25 + 0.75 * item) * tints[i]
        region.mul_(1 - alpha).add_(alpha * colour)
        masks[i, y0 : y0 + side, x0 : x0 + side] = alpha[0] >= 0.5
    return masks


def compose_scenes(
    objects: Tensor,
    labels: Tensor,
    n: int,
    *,
    objects_per_scene: int = 2,
    image_size: int = 224,
    object_size: tuple[float, float] = (0.34, 0.44),
    clutter: Optional[Sequence[Tensor]] = None,
    classes: Optional[Tensor] = None,
    seed: int = 0,
) -> PhotoScenes:
    """``n`` scenes, each holding ``objects_per_scene`` photos of distinct classes.

    Args:
        objects: ``(M, 1 or 3, h, w)`` photos in ``[0, 1]``, the object bright on a dark
            ground (its intensity is its opacity).
        labels: ``(M,)`` the class of each photo.
        n: number of scenes.
        objects_per_scene: 1 to 4; each object sits in its own cell of a 2 x 2 grid.
        image_size: the side ``S`` of the square scenes.
        object_size: range of an object's side as a fraction of ``S`` (at most 0.5).
        clutter: background photos ``(C, H, W)`` in [0, 1], any sizes; each scene's
            background is a random crop of one (default: a plain smooth field).
        classes: ``(n, K)`` the classes of each scene's objects (default: random distinct
            classes).
        seed: seeds a private generator (the global RNG is untouched).

    Returns:
        A :class:`PhotoScenes`; objects are listed in the order they were pasted, which
        never overlap.
    """
    objects, labels = _check(objects, labels, image_size)
    k = int(objects_per_scene)
    known = labels.unique()
    if not 1 <= k <= min(4, len(known)):
        raise ValueError(f"objects_per_scene must be 1 to {min(4, len(known))}, got {k}")
    low, high = object_size
    if not 0 < low <= high <= 0.5:
        raise ValueError(f"object_size must satisfy 0 < low <= high <= 0.5, got {object_size}")
    g = torch.Generator().manual_seed(int(seed))
    size = int(image_size)
    images = _background(n, size, clutter, g)
    backgrounds = images.clone()
    if classes is None:
        chosen = known[torch.rand(n, len(known), generator=g).argsort(1)[:, :k]]  # (n, k)
    else:
        chosen = torch.as_tensor(classes).long().reshape(n, k)
    sources = torch.stack([_photo_of(labels, chosen[:, j], g) for j in range(k)], 1)
    cells = torch.rand(n, 4, generator=g).argsort(1)[:, :k]
    masks = torch.zeros(n, k, size, size, dtype=torch.bool)
    tints = _tints(n, g)  # one colour for all of a scene's objects: colour cannot tell them apart
    half = size // 2
    for j in range(k):
        sides = (size * (low + (high - low) * torch.rand(n, generator=g))).long()
        slack = (half - sides).clamp_min(0)
        offset = torch.stack([(torch.rand(n, generator=g) * (slack + 1)).long() for _ in "yx"], 1)
        corner = torch.stack([cells[:, j] // 2, cells[:, j] % 2], 1) * half
        centres = corner + offset + (sides // 2)[:, None]
        flips = torch.rand(n, generator=g) < 0.5
        masks[:, j] = _paste(images, objects[sources[:, j]], centres, sides, flips, tints)
    colours = tints.view(n, 1, 3).expand(n, k, 3).clone()
    return PhotoScenes(images.contiguous(), chosen, masks, masks_to_boxes(masks), colours, sources,
                       backgrounds)


def compose_views(
    objects: Tensor,
    labels: Tensor,
    classes: Tensor,
    *,
    exclude: Optional[Tensor] = None,
    image_size: int = 224,
    object_size: tuple[float, float] = (0.5, 0.7),
    clutter: Optional[Sequence[Tensor]] = None,
    seed: int = 0,
) -> PhotoScenes:
    """One single-object image per entry of ``classes``: a random photo of that class
    (another than ``exclude``'s entry, e.g. the scene's own photo), larger, moved and
    possibly mirrored, on its own background (plain unless ``clutter`` is given).
    Arguments as for :func:`compose_scenes`."""
    objects, labels = _check(objects, labels, image_size)
    g = torch.Generator().manual_seed(int(seed))
    classes = torch.as_tensor(classes).reshape(-1).long()
    n, size = classes.shape[0], int(image_size)
    images = _background(n, size, clutter, g)
    backgrounds = images.clone()
    sources = _photo_of(labels, classes, g, exclude)
    low, high = object_size
    sides = (size * (low + (high - low) * torch.rand(n, generator=g))).long().clamp_max(size)
    slack = size - sides
    centres = torch.stack([(torch.rand(n, generator=g) * (slack + 1)).long() for _ in "yx"], 1)
    centres = centres + (sides // 2)[:, None]
    flips = torch.rand(n, generator=g) < 0.5
    tints = _tints(n, g)
    masks = _paste(images, objects[sources], centres, sides, flips, tints)[:, None]
    return PhotoScenes(images.contiguous(), classes[:, None], masks, masks_to_boxes(masks),
                       tints.view(n, 1, 3), sources[:, None], backgrounds)


def _photo_of(
    labels: Tensor, classes: Tensor, g: torch.Generator, exclude: Optional[Tensor] = None
) -> Tensor:
    """A random photo index of each class in ``classes`` (never ``exclude``'s entry)."""
    out = torch.empty_like(classes)
    for i, c in enumerate(classes.tolist()):
        pool = torch.nonzero(labels == c).flatten()
        if exclude is not None and pool.numel() > 1:
            pool = pool[pool != exclude[i]]
        if pool.numel() == 0:
            raise ValueError(f"no photo of class {c}")
        out[i] = pool[torch.randint(pool.numel(), (1,), generator=g)]
    return out
