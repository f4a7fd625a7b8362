"""Procedural "shapes in clutter" images: the class is the shape of one object.

The background and one or two small distractor blobs carry no class information, so the
evidence for a similarity decision is the object itself: maps can be checked to land on
it. Nothing is downloaded.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# object_coordinates, saturated_colours and shape_masks also draw the objects of scenes.py.
__all__ = ["SHAPE_CLASSES", "make_shapes"]

#: Names of the :func:`make_shapes` classes, in label order (``num_classes`` takes a prefix).
SHAPE_CLASSES: tuple[str, ...] = (
    "disc",
    "square",
    "triangle",
    "cross",
    "ring",
    "bar",
    "diamond",
    "frame",
)


def shape_masks(u: Tensor, v: Tensor, labels: Tensor) -> Tensor:
    """Boolean masks (N, S, S) of each image's shape in object coordinates ``u, v``.

    ``u`` and ``v`` are (N, S, S) coordinates centred on the object and scaled so that
    the object roughly fills ``[-1, 1]^2``; ``labels`` (N,) selects the shape per image.
    """
    masks = torch.zeros(u.shape, dtype=torch.bool)
    for k, shape in enumerate(_SHAPES):
        sel = torch.nonzero(labels == k).flatten()
        if len(sel):
            masks[sel] = shape(u[sel], v[sel])
    return masks


def _disc(u: Tensor, v: Tensor) -> Tensor:
    return u * u + v * v <= 1.0


def _square(u: Tensor, v: Tensor) -> Tensor:
    return torch.maximum(u.abs(), v.abs()) <= 0.8


def _triangle(u: Tensor, v: Tensor) -> Tensor:  # apex up (v grows downwards)
    return (v >= -0.85) & (v <= 0.75) & (u.abs() <= (v + 0.85) * 0.6)


def _cross(u: Tensor, v: Tensor) -> Tensor:
    au, av = u.abs(), v.abs()
    return ((au <= 0.28) & (av <= 0.95)) | ((av <= 0.28) & (au <= 0.95))


def _ring(u: Tensor, v: Tensor) -> Tensor:
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= 0.55**2)


def _bar(u: Tensor, v: Tensor) -> Tensor:  # horizontal
    return (u.abs() <= 1.0) & (v.abs() <= 0.3)


def _diamond(u: Tensor, v: Tensor) -> Tensor:
    return u.abs() + v.abs() <= 1.05


def _frame(u: Tensor, v: Tensor) -> Tensor:  # hollow square
    box = torch.maximum(u.abs(), v.abs())
    return (box <= 0.85) & (box >= 0.52)


_SHAPES = (_disc, _square, _triangle, _cross, _ring, _bar, _diamond, _frame)


def object_coordinates(
    yy: Tensor, xx: Tensor, cy: Tensor, cx: Tensor, half: Tensor, max_degrees: float,
    g: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Pixel coordinates ``(u, v)`` in each object's frame: centred at ``(cy, cx)``, scaled
    by ``half`` with a random aspect jitter (+-15 %), rotated by up to ``max_degrees``.
    The shape drawers take these (``|u|, |v| <= 1`` is the object's box)."""
    n = cy.shape[0]
    aspect = 1.0 + 0.15 * (2 * torch.rand(n, 1, 1, generator=g) - 1)
    theta = math.radians(max_degrees) * (2 * torch.rand(n, 1, 1, generator=g) - 1)
    dy, dx = yy - cy, xx - cx
    cos, sin = torch.cos(theta), torch.sin(theta)
    u = (cos * dx + sin * dy) / (half * aspect)
    v = (-sin * dx + cos * dy) * (aspect / half)
    return u, v


def saturated_colours(n: int, g: torch.Generator) -> Tensor:
    """Random RGB colours (n, 3) whose channels sit away from the mid-grey background."""
    c = torch.rand(n, 3, generator=g)
    hi = torch.rand(n, 3, generator=g) < 0.5
    # Every channel is either dark (0..0.22) or bright (0.78..1); never all mid-grey.
    return torch.where(hi, 0.78 + 0.22 * c, 0.22 * c)


def make_shapes(
    n_per_class: int,
    num_classes: int = 6,
    image_size: int = 48,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Procedural "shapes in clutter" images and labels.

    Each image holds one object whose shape is the class (see :data:`SHAPE_CLASSES`),
    drawn at a random position, scale (about 1/3 to 3/5 of the image side), aspect
    (+-15%), rotation (+-15 degrees) and saturated random colour, over a smooth
    random-coloured background with one or two small soft distractor discs (same colour
    distribution as the objects, no class information) and pixel noise everywhere.
    Generation is vectorised and deterministic given ``seed``.

    Args:
        n_per_class: images per class.
        num_classes: number of classes, 1 to ``len(SHAPE_CLASSES)``.
        image_size: side ``S`` of the square images (at least 16).
        seed: seed of the private ``torch.Generator``; the global RNG is untouched.

    Returns:
        ``(images, labels)``: float32 ``(N, 3, S, S)`` in ``[0, 1]`` and int64 ``(N,)``
        with ``N = n_per_class * num_classes``, classes interleaved (0, 1, ..., 0, 1, ...).
    """
    if not 1 <= num_classes <= len(SHAPE_CLASSES):
        raise ValueError(f"num_classes must be in [1, {len(SHAPE_CLASSES)}], got {num_classes}")
    if n_per_class < 0:
        raise ValueError(f"n_per_class must be >= 0, got {n_per_class}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    g = torch.Generator().manual_seed(int(seed))
    s = int(image_size)
    n = n_per_class * num_classes
    labels = torch.arange(num_classes, dtype=torch.int64).repeat(n_per_class)
    if n == 0:
        return torch.zeros(0, 3, s, s), labels

    coords = torch.arange(s, dtype=torch.float32) + 0.5
    yy = coords.view(1, s, 1)
    xx = coords.view(1, 1, s)

    # Background: a random muted colour plus a low-frequency brightness field (4x4 noise,
    # bilinearly upsampled). Compositing below is in place to keep memory traffic low.
    base = 0.35 + 0.3 * torch.rand(n, 3, 1, 1, generator=g)
    field = 0.2 * (torch.rand(n, 1, 4, 4, generator=g) - 0.5)
    images = base + F.interpolate(field, size=(s, s), mode="bilinear", align_corners=False)

    # Distractors: one or two small soft-edged discs per image.
    n_blobs = 1 + (torch.rand(n, generator=g) < 0.5).long()
    for b in range(2):
        present = (n_blobs > b).float().view(n, 1, 1)
        r = s * (0.05 + 0.04 * torch.rand(n, 1, 1, generator=g))
        cy = s * (0.1 + 0.8 * torch.rand(n, 1, 1, generator=g))
        cx = s * (0.1 + 0.8 * torch.rand(n, 1, 1, generator=g))
        d = torch.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        alpha = (r + 0.5 - d).clamp_(0.0, 1.0).mul_(present).unsqueeze(1)
        colour = saturated_colours(n, g).view(n, 3, 1, 1)
        images.lerp_(colour.expand_as(images), alpha)

    # Object: random half-size, centre kept inside the image, aspect jitter, rotation.
    half = s * (0.17 + 0.12 * torch.rand(n, 1, 1, generator=g))
    cy = half + (s - 2 * half) * torch.rand(n, 1, 1, generator=g)
    cx = half + (s - 2 * half) * torch.rand(n, 1, 1, generator=g)
    u, v = object_coordinates(yy, xx, cy, cx, half, 15.0, g)
    mask = shape_masks(u, v, labels).unsqueeze(1).float()
    colour = saturated_colours(n, g).view(n, 3, 1, 1)
    images.lerp_(colour.expand_as(images), mask)

    # Brightness noise over every pixel, object included.
    images.add_(torch.empty(n, 1, s, s).uniform_(-0.12, 0.12, generator=g))
    return images.clamp_(0.0, 1.0).contiguous(), labels
