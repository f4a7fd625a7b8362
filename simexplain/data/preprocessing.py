"""Turning image files or PIL images into model inputs with the model's own preprocessing."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn

from ..errors import InputError

__all__ = ["Preprocessing", "resolve_preprocessing", "square_preprocessing", "load_image",
           "preprocess_images"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageLike = Union[str, "os.PathLike[str]", Image.Image]


@dataclass(frozen=True)
class Preprocessing:
    """A PIL-to-tensor transform and the mean/std it normalises with (for display)."""

    transform: Callable[[Image.Image], Tensor]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def resolve_preprocessing(model: nn.Module, transform: Any = None) -> Preprocessing:
    """The preprocessing to use for ``model``.

    In order: ``transform`` when given (a :class:`Preprocessing`, a callable, or
    torchvision weights such as ``ResNet50_Weights.DEFAULT``, whose ``.transforms()`` is
    used); timm's data config when the model carries a ``pretrained_cfg``; else ImageNet's
    resize-256, crop-224, mean/std normalisation.
    """
    if isinstance(transform, Preprocessing):
        return transform
    if transform is not None and callable(getattr(transform, "transforms", None)):
        transform = transform.transforms()
    if transform is not None:
        if not callable(transform):
            raise InputError(
                f"transform must be callable or torchvision weights, got {transform!r}"
            )
        mean = tuple(getattr(transform, "mean", IMAGENET_MEAN))
        std = tuple(getattr(transform, "std", IMAGENET_STD))
        return Preprocessing(transform, mean, std)
    if getattr(model, "pretrained_cfg", None):
        from timm.data import create_transform, resolve_data_config

        config = resolve_data_config(model=model)
        return Preprocessing(
            create_transform(**config), tuple(config["mean"]), tuple(config["std"])
        )
    return square_preprocessing(256, 224, IMAGENET_MEAN, IMAGENET_STD)


def square_preprocessing(
    resize: int, crop: "Union[int, tuple[int, int]]", mean: Sequence[float],
    std: Sequence[float],
) -> Preprocessing:
    """The shorter side resized to ``resize``, a centre crop ``crop x crop`` (or
    ``(height, width)``), then normalised with ``mean`` and ``std``.

    >>> square_preprocessing(64, 56, (0.5,) * 3, (0.5,) * 3).mean
    (0.5, 0.5, 0.5)
    """
    from torchvision import transforms as T

    pipeline = T.Compose([T.Resize(resize), T.CenterCrop(crop), T.ToTensor(),
                          T.Normalize(mean, std)])
    return Preprocessing(pipeline, tuple(mean), tuple(std))


def load_image(image: ImageLike) -> Image.Image:
    """Open an image file (or pass a PIL image through) as RGB, with a clear error."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = os.fspath(image)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise InputError(f"cannot read image {path}: {error}") from None


def preprocess_images(images: Sequence[ImageLike], preprocessing: Preprocessing) -> Tensor:
    """Load and transform images into one batch ``(N, C, H, W)``."""
    tensors = [preprocessing.transform(load_image(image)) for image in images]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise InputError(
            f"the transform produced images of different shapes {sorted(shapes)}; use a "
            "transform that resizes and crops to one size"
        )
    return torch.stack(tensors)
