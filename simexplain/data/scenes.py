"""Synthetic scenes with exact ground truth: objects pasted on cluttered backgrounds.

:func:`make_scenes` draws images holding one or more class objects (the procedural shapes
of :func:`simexplain.data.make_shapes`) at random positions and scales over a noisy,
smoothly shaded background with small class-free distractor blobs. It returns each
object's class, its exact visible mask (after occlusion by objects pasted later) and its
box, so localisation and segmentation can be scored without annotation noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .shapes import SHAPE_CLASSES, object_coordinates, saturated_colours, shape_masks

__all__ = ["Scenes", "make_scenes", "masks_to_boxes"]


@dataclass
class Scenes:
    """A batch of generated scenes and their ground truth.

    Attributes:
        images: ``(N, 3, S, S)`` float32 in ``[0, 1]``.
        labels: ``(N, K)`` int64 class of each object (distinct within a scene); object
            ``0`` is pasted first, so later objects may occlude it.
        masks: ``(N, K, S, S)`` bool, the pixels where each object is visible.
        boxes: ``(N, K, 4)`` float32 ``x1, y1, x2, y2`` in pixels, the tight box of each
            visible mask (a pixel ``(row, col)`` is inside when ``x1 <= col < x2`` and
            ``y1 <= row < y2``); all zeros for an object hidden completely.
        colours: ``(N, K, 3)`` the flat RGB colour each object was painted with.
    """

    images: Tensor
    labels: Tensor
    masks: Tensor
    boxes: Tensor
    colours: Tensor

    def __len__(self) -> int:
        return self.images.shape[0]


def masks_to_boxes(masks: Tensor) -> Tensor:
    """Tight ``x1, y1, x2, y2`` boxes ``(..., 4)`` of bool masks ``(..., H, W)``.

    ``x2`` and ``y2`` are exclusive (one past the last column and row); empty masks give
    zeros.

    Example:
        >>> m = torch.zeros(1, 5, 6, dtype=torch.bool)
        >>> m[0, 1:3, 2:5] = True
        >>> masks_to_boxes(m).tolist()
        [[2.0, 1.0, 5.0, 3.0]]
    """
    height, width = masks.shape[-2:]
    cols = masks.any(dim=-2)  # (..., W)
    rows = masks.any(dim=-1)  # (..., H)
    col_idx = torch.arange(width, device=masks.device)
    row_idx = torch.arange(height, device=masks.device)
    x1 = torch.where(cols, col_idx, width).amin(dim=-1)
    x2 = torch.where(cols, col_idx + 1, 0).amax(dim=-1)
    y1 = torch.where(rows, row_idx, height).amin(dim=-1)
    y2 = torch.where(rows, row_idx + 1, 0).amax(dim=-1)
    boxes = torch.stack([x1, y1, x2, y2], dim=-1).float()
    return torch.where(cols.any(dim=-1, keepdim=True), boxes, torch.zeros_like(boxes))


def make_scenes(
    n: int,
    objects_per_scene: int = 1,
    num_classes: int = 6,
    image_size: int = 64,
    scale: tuple[float, float] = (0.12, 0.2),
    distractors: int = 3,
    noise: float = 0.1,
    seed: int = 0,
    classes: Tensor | None = None,
) -> Scenes:
    """Generate ``n`` scenes, each holding ``objects_per_scene`` objects of distinct classes.

    Objects are the shapes of :data:`simexplain.data.SHAPE_CLASSES` with a random
    half-size (``scale`` times the image side), aspect (+-15%), rotation (+-20 degrees) and
    saturated colour. Each object sits in its own cell of a 2 x 2 grid (random cells,
    jittered centres), so objects rarely overlap; where they do, the later one wins and the
    earlier one's mask loses those pixels. The background is a muted colour with a smooth
    brightness field, ``distractors`` soft blobs of saturated colour (no class, not in any
    mask) and uniform brightness noise of amplitude ``noise`` everywhere. Vectorised in
    torch and deterministic given ``seed`` (the global RNG is untouched).

    Args:
        n: number of scenes.
        objects_per_scene: ``K``, 1 to 4 objects per scene.
        num_classes: classes drawn from, ``K`` to ``len(SHAPE_CLASSES)``.
        image_size: side ``S`` of the square images (at least 16).
        scale: range of the object half-size as a fraction of ``S``, within ``(0, 0.25]``.
        distractors: class-free blobs per scene.
        noise: amplitude of the per-pixel brightness noise (0 for exact flat objects).
        seed: seed of the private generator.
        classes: optional ``(n, K)`` int64 classes to draw instead of random ones.

    Returns:
        A :class:`Scenes`.

    Example:
        >>> s = make_scenes(4, objects_per_scene=2, image_size=32, seed=1)
        >>> tuple(s.images.shape), tuple(s.masks.shape), tuple(s.boxes.shape)
        ((4, 3, 32, 32), (4, 2, 32, 32), (4, 2, 4))
        >>> bool((s.labels[:, 0] != s.labels[:, 1]).all())
        True
    """
    k = int(objects_per_scene)
    if not 1 <= k <= 4:
        raise ValueError(f"objects_per_scene must be 1 to 4, got {objects_per_scene}")
    if not k <= num_classes <= len(SHAPE_CLASSES):
        raise ValueError(
            f"num_classes must be in [{k}, {len(SHAPE_CLASSES)}] for {k} distinct objects "
            f"per scene, got {num_classes}"
        )
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    low, high = float(scale[0]), float(scale[1])
    if not 0 < low <= high <= 0.25:
        raise ValueError(f"scale must satisfy 0 < low <= high <= 0.25, got {scale}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    g = torch.Generator().manual_seed(int(seed))
    s = int(image_size)
    if classes is None:
        labels = torch.rand(n, num_classes, generator=g).argsort(dim=1)[:, :k]
    else:
        labels = torch.as_tensor(classes, dtype=torch.int64).reshape(n, k)
        if n and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"classes must lie in [0, {num_classes - 1}]")

    coords = torch.arange(s, dtype=torch.float32) + 0.5
    yy, xx = coords.view(1, s, 1), coords.view(1, 1, s)
    images = _cluttered_background(n, yy, xx, int(distractors), g)
    cells = torch.rand(n, 4, generator=g).argsort(dim=1)[:, :k]  # one grid cell per object
    masks = torch.zeros(n, k, s, s, dtype=torch.bool)
    colours = torch.zeros(n, k, 3)
    for j in range(k):
        half = s * (low + (high - low) * torch.rand(n, 1, 1, generator=g))
        cell = cells[:, j].view(n, 1, 1)
        # Centre inside the cell, jittered, but never so close to the border that it clips.
        jitter = torch.rand(n, 2, 1, 1, generator=g)
        cy = ((cell // 2).float() + 0.25 + 0.5 * jitter[:, 0]) * (s / 2)
        cx = ((cell % 2).float() + 0.25 + 0.5 * jitter[:, 1]) * (s / 2)
        cy = torch.minimum(torch.maximum(cy, half), s - half)
        cx = torch.minimum(torch.maximum(cx, half), s - half)
        u, v = object_coordinates(yy, xx, cy, cx, half, 20.0, g)
        shape = shape_masks(u, v, labels[:, j])
        masks[:, :j] &= ~shape.unsqueeze(1)
        masks[:, j] = shape
        colours[:, j] = saturated_colours(n, g)
        # A hard paste (mask 0 or 1), so the mask is exactly the pixels painted.
        images = torch.where(shape.unsqueeze(1), colours[:, j].view(n, 3, 1, 1), images)

    if noise:
        images = images + torch.empty(n, 1, s, s).uniform_(-noise, noise, generator=g)
    return Scenes(
        images=images.clamp(0.0, 1.0).contiguous(),
        labels=labels,
        masks=masks,
        boxes=masks_to_boxes(masks),
        colours=colours,
    )


def _cluttered_background(
    n: int, yy: Tensor, xx: Tensor, distractors: int, g: torch.Generator
) -> Tensor:
    """``(n, 3, S, S)``: a muted colour, a smooth brightness field and soft colour blobs."""
    s = yy.shape[1]
    base = 0.35 + 0.3 * torch.rand(n, 3, 1, 1, generator=g)
    field = 0.2 * (torch.rand(n, 1, 5, 5, generator=g) - 0.5)
    images = base + F.interpolate(field, size=(s, s), mode="bilinear", align_corners=False)
    for _ in range(distractors):
        r = s * (0.03 + 0.04 * torch.rand(n, 1, 1, generator=g))
        cy = s * torch.rand(n, 1, 1, generator=g)
        cx = s * torch.rand(n, 1, 1, generator=g)
        dist = torch.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        alpha = (r + 0.5 - dist).clamp_(0.0, 1.0).unsqueeze(1)
        colour = saturated_colours(n, g).view(n, 3, 1, 1)
        images.lerp_(colour.expand_as(images), alpha)
    return images
