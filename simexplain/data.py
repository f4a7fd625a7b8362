"""Small offline datasets and tuple samplers for demos and tests.

Nothing here downloads anything:

* :func:`make_shapes` draws a procedural dataset of coloured shapes on a cluttered,
  noisy background. The class is the shape of one object; the background and one or
  two small distractor blobs carry no class information, so the evidence for a
  similarity decision is the object itself. Useful to check that explanation maps
  land on the object.
* :func:`load_fashion_mnist` reads the Fashion-MNIST IDX files from a local folder
  (the Debian package ``dataset-fashion-mnist`` installs them in
  ``/usr/share/datasets/fashion-mnist``).
* :func:`sample_tuples` draws index tuples (pairs, triplets, quadruplets) from labels.
"""

from __future__ import annotations

import gzip
import math
import os
import struct

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .weights import KINDS

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "SHAPE_CLASSES",
    "TUPLE_KINDS",
    "fashion_mnist_available",
    "load_fashion_mnist",
    "make_shapes",
    "sample_tuples",
    "to_rgb",
]

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

#: Names of the ten Fashion-MNIST classes, in label order.
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

#: Where the Debian package ``dataset-fashion-mnist`` puts the IDX files.
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"

#: Tuple kinds understood by :func:`sample_tuples`, with their tuple sizes.
TUPLE_KINDS = KINDS


# --------------------------------------------------------------------------- shapes


def _shape_masks(u: Tensor, v: Tensor, labels: Tensor) -> Tensor:
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
    The shape drawers take these (|u|, |v| <= 1 is the object's box)."""
    n = cy.shape[0]
    aspect = 1.0 + 0.15 * (2 * torch.rand(n, 1, 1, generator=g) - 1)
    theta = math.radians(max_degrees) * (2 * torch.rand(n, 1, 1, generator=g) - 1)
    dy, dx = yy - cy, xx - cx
    cos, sin = torch.cos(theta), torch.sin(theta)
    u = (cos * dx + sin * dy) / (half * aspect)
    v = (-sin * dx + cos * dy) * (aspect / half)
    return u, v


def _saturated_colours(n: int, g: torch.Generator) -> Tensor:
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
        colour = _saturated_colours(n, g).view(n, 3, 1, 1)
        images.lerp_(colour.expand_as(images), alpha)

    # Object: random half-size, centre kept inside the image, aspect jitter, rotation.
    half = s * (0.17 + 0.12 * torch.rand(n, 1, 1, generator=g))
    cy = half + (s - 2 * half) * torch.rand(n, 1, 1, generator=g)
    cx = half + (s - 2 * half) * torch.rand(n, 1, 1, generator=g)
    u, v = object_coordinates(yy, xx, cy, cx, half, 15.0, g)
    mask = _shape_masks(u, v, labels).unsqueeze(1).float()
    colour = _saturated_colours(n, g).view(n, 3, 1, 1)
    images.lerp_(colour.expand_as(images), mask)

    # Brightness noise over every pixel, object included.
    images.add_(torch.empty(n, 1, s, s).uniform_(-0.12, 0.12, generator=g))
    return images.clamp_(0.0, 1.0).contiguous(), labels


# --------------------------------------------------------------------------- Fashion-MNIST


def _fashion_files(root: str, train: bool) -> tuple[str, str]:
    prefix = "train" if train else "t10k"
    return (
        os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"),
        os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"),
    )


def fashion_mnist_available(root: str = FASHION_MNIST_ROOT) -> bool:
    """Whether the four Fashion-MNIST IDX files are present under ``root``."""
    return all(os.path.isfile(p) for t in (True, False) for p in _fashion_files(root, t))


def _read_idx(path: str, limit: int | None) -> np.ndarray:
    """Read a (gzip) IDX file of unsigned bytes, decoding only the first ``limit`` items."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        magic = fh.read(4)
        if len(magic) < 4:
            raise ValueError(f"{path}: truncated IDX header")
        zero, dtype_code, ndim = struct.unpack(">HBB", magic)
        if zero != 0 or dtype_code != 0x08 or ndim < 1:
            raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {magic.hex()})")
        dims = fh.read(4 * ndim)
        if len(dims) < 4 * ndim:
            raise ValueError(f"{path}: truncated IDX header")
        shape = list(struct.unpack(f">{ndim}I", dims))
        count = shape[0] if limit is None else min(shape[0], max(int(limit), 0))
        item = int(np.prod(shape[1:], dtype=np.int64))
        payload = fh.read(count * item)
    if len(payload) < count * item:
        raise ValueError(f"{path}: truncated IDX payload")
    return np.frombuffer(payload, dtype=np.uint8).reshape([count, *shape[1:]])


def load_fashion_mnist(
    root: str = FASHION_MNIST_ROOT,
    train: bool = True,
    limit: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Load Fashion-MNIST from local gzip IDX files.

    Args:
        root: folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``.
        train: the 60k training split if true, else the 10k test split.
        limit: keep only the first ``limit`` examples (all when ``None``).

    Returns:
        ``(images, labels)``: float32 ``(N, 1, 28, 28)`` in ``[0, 1]`` and int64 ``(N,)``.

    Raises:
        FileNotFoundError: if the files are missing, naming ways to get them.
    """
    img_path, lbl_path = _fashion_files(root, train)
    missing = [p for p in (img_path, lbl_path) if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found: {', '.join(missing)}. Install them with the "
            "Debian package `dataset-fashion-mnist` (apt-get install -y dataset-fashion-mnist), "
            "or fetch them with torchvision.datasets.FashionMNIST(root, download=True) and pass "
            "root=<that folder>/FashionMNIST/raw."
        )
    images = _read_idx(img_path, limit)
    labels = _read_idx(lbl_path, limit)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"unexpected IDX shapes {images.shape} and {labels.shape} in {root}")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def to_rgb(images: Tensor, size: int | tuple[int, int] | None = None) -> Tensor:
    """Make images 3-channel and optionally resize them (bilinear), values kept in [0, 1].

    Args:
        images: ``(N, C, H, W)`` or ``(C, H, W)`` with ``C`` 1 (repeated) or 3 (kept).
        size: output side or ``(H, W)``; ``None`` keeps the size.
    """
    squeeze = images.dim() == 3
    x = images.unsqueeze(0) if squeeze else images
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected (N, 1|3, H, W) images, got shape {tuple(images.shape)}")
    x = x.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if size is not None:
        hw = (size, size) if isinstance(size, int) else tuple(size)
        if tuple(x.shape[-2:]) != hw:
            x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True)
            x = x.clamp(0.0, 1.0)
    x = x.contiguous()
    return x[0] if squeeze else x


# --------------------------------------------------------------------------- tuples


def sample_tuples(
    labels: Tensor,
    kind: str,
    n: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw ``n`` random index tuples of the given kind from ``labels``.

    Kinds and columns:

    * ``"same_pair"``: ``(i, j)`` with the same label, ``i != j``;
    * ``"different_pair"``: ``(i, j)`` with different labels;
    * ``"triplet"``: ``(anchor, positive, negative)``;
    * ``"quadruplet"``: ``(anchor, positive, negative1, negative2)``; both negatives
      differ in label from the anchor, and from each other when there are three or more
      classes.

    Anchors are uniform over the examples that can serve as one (those with another
    example of the same class when a positive is needed); positives are uniform over
    the other examples of the anchor's class; negatives pick a uniform other class,
    then a uniform example of it. Vectorised; deterministic given ``generator``.

    Returns:
        int64 tensor ``(n, T)`` of indices into ``labels``, ``T`` from :data:`TUPLE_KINDS`.
    """
    if kind not in TUPLE_KINDS:
        raise ValueError(f"kind must be one of {sorted(TUPLE_KINDS)}, got {kind!r}")
    labels = torch.as_tensor(labels).reshape(-1).long().cpu()
    width = TUPLE_KINDS[kind]
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n == 0:
        return torch.zeros(0, width, dtype=torch.int64)

    # Group example indices by class: order[start[c] : start[c] + count[c]] are class c.
    classes, cls_of, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    num_cls = len(classes)
    order = torch.argsort(cls_of, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(labels)) - starts[cls_of[order]]

    need_pos = kind != "different_pair"
    need_neg = kind != "same_pair"
    if need_neg and num_cls < 2:
        raise ValueError(f"{kind!r} needs at least two classes, labels have {num_cls}")
    eligible = torch.ones(len(labels), dtype=torch.bool)
    if need_pos:
        eligible = counts[cls_of] >= 2
        if not bool(eligible.any()):
            raise ValueError(f"{kind!r} needs a class with at least two examples")
    pool = torch.nonzero(eligible).flatten()
    anchor = pool[torch.randint(len(pool), (n,), generator=generator)]
    a_cls = cls_of[anchor]
    cols = [anchor]

    if need_pos:
        cnt = counts[a_cls]
        shift = 1 + (torch.rand(n, generator=generator) * (cnt - 1)).long().clamp_max(cnt - 2)
        cols.append(order[starts[a_cls] + (rank[anchor] + shift) % cnt])

    def member(cls: Tensor) -> Tensor:
        pick = (torch.rand(n, generator=generator) * counts[cls]).long()
        return order[starts[cls] + pick.clamp_max(counts[cls] - 1)]

    if need_neg:
        k1 = torch.randint(1, num_cls, (n,), generator=generator)
        cols.append(member((a_cls + k1) % num_cls))
        if kind == "quadruplet":
            if num_cls >= 3:
                # A second offset in [1, num_cls) different from k1.
                step = torch.randint(1, num_cls - 1, (n,), generator=generator)
                k2 = 1 + (k1 - 1 + step) % (num_cls - 1)
            else:
                k2 = k1
            cols.append(member((a_cls + k2) % num_cls))

    return torch.stack(cols, dim=1)
