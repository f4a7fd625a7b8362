"""Fashion-MNIST from its local IDX files (the Debian package ``dataset-fashion-mnist``).

Real photographs of clothing items, offline: :func:`load_fashion_mnist` reads a split,
:func:`fashion_mnist_split` gives the retrieval benchmarks' unseen-class protocol, and
:func:`to_rgb` makes the grey images model inputs.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "fashion_mnist_available",
    "load_fashion_mnist",
    "to_rgb",
    "TensorSplit",
    "fashion_mnist_split",
]

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


@dataclass
class TensorSplit:
    """Images ``(N, C, H, W)`` in [0, 1] and int64 labels ``(N,)`` of a class split."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    class_names: list[str]


def fashion_mnist_split(
    root: str = FASHION_MNIST_ROOT,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> TensorSplit:
    """Fashion-MNIST split by class: 0-4 (T-shirt ... Coat) train, 5-9 (Sandal ... boot) test.

    Training images come from the 60k training file, test images from the 10k test file
    (30,000 and 5,000 images), as ``(N, 1, 28, 28)`` float tensors in [0, 1].

    Args:
        root: folder of the IDX files (see :func:`load_fashion_mnist`).
        train_limit, test_limit: keep only the first so many images of each split.

    Raises:
        FileNotFoundError: when the files are missing (the message says how to get them).
    """
    train_images, train_labels = load_fashion_mnist(root, train=True)
    test_images, test_labels = load_fashion_mnist(root, train=False)
    keep_train = torch.nonzero(train_labels < 5).flatten()[:train_limit]
    keep_test = torch.nonzero(test_labels >= 5).flatten()[:test_limit]
    return TensorSplit(
        train_images[keep_train], train_labels[keep_train],
        test_images[keep_test], test_labels[keep_test], list(FASHION_MNIST_CLASSES),
    )
