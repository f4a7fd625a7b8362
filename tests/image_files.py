"""Image files written by tests: random noise images and a fixed-size preprocessing."""

from __future__ import annotations

import numpy as np
from PIL import Image
from torchvision import transforms as T

from simexplain.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing


def write_image(path, seed, size=(70, 64)) -> str:
    """A uniform-noise RGB image ``size = (width, height)`` at ``path``; returns the path."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def sized(mean=IMAGENET_MEAN, std=IMAGENET_STD, size=64) -> Preprocessing:
    """Resize, centre-crop to ``size`` and normalise: the CLI's ``--size`` pipeline."""
    pipeline = T.Compose(
        [T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)]
    )
    return Preprocessing(pipeline, tuple(mean), tuple(std))


def write_labelled_folders(root, counts):
    """Under ``root``, for each ``split: n`` of ``counts``, ``split/cat/`` and ``split/dog/``
    with ``n`` images each (seeds 1, 2, ... in order); returns ``root``."""
    seed = 0
    for split, count in counts.items():
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                seed += 1
                write_image(root / split / label / f"{i}.png", seed=seed)
    return root
