"""scikit-image's photographs, offline: real images for the demo and the benchmarks.

scikit-image ships a few photographs in its wheel (a cat, a cup of coffee, a rocket, an
astronaut, motorcycles, textures), so nothing is downloaded. They are read from its
package folder with PIL, without importing scikit-image itself (a slow import).
scikit-image is in simexplain's ``demo`` and ``bench`` extras.

>>> import importlib.util
>>> if importlib.util.find_spec("skimage") is not None:
...     print(tuple(square_photos(["chelsea.png"], 32).shape))
... else:
...     print((1, 3, 32, 32))
(1, 3, 32, 32)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import MissingExtraError

__all__ = [
    "OBJECT_PHOTOS",
    "CLUTTER_PHOTOS",
    "skimage_folder",
    "read_photo",
    "square_photos",
    "clutter_photos",
]

#: scikit-image's colour and grey photographs of objects and scenes (not its textures).
OBJECT_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg",
                 "motorcycle_left.png", "motorcycle_right.png", "ihc.png", "camera.png")

#: Photographs of textures, used as scene clutter: no salient object of their own,
#: nothing like a Fashion-MNIST class.
CLUTTER_PHOTOS = ("brick.png", "grass.png", "gravel.png", "hubble_deep_field.jpg",
                  "moon.png", "coins.png")


def skimage_folder() -> Path:
    """The folder of scikit-image's bundled photographs.

    Raises:
        MissingExtraError: scikit-image is not installed.
    """
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(
            "scikit-image is not installed; it brings the photographs: install simexplain "
            "with its demo extra, pip install -e '.[demo]' from the repository"
        )
    return Path(spec.submodule_search_locations[0]) / "data"


def read_photo(name: str, box: Optional[tuple[float, float, float, float]] = None,
               size: Optional[tuple[int, int]] = None) -> Tensor:
    """One of scikit-image's photographs as RGB ``(3, H, W)`` in [0, 1].

    Args:
        name: its file name, e.g. ``"chelsea.png"``.
        box: a crop ``(left, top, right, bottom)`` in fractions of the width and height.
        size: resize (after the crop) to ``(height, width)``.
    """
    from PIL import Image

    with Image.open(skimage_folder() / name) as image:
        image = image.convert("RGB")
        if box is not None:
            w, h = image.size
            image = image.crop((round(box[0] * w), round(box[1] * h),
                                round(box[2] * w), round(box[3] * h)))
        if size is not None:
            image = image.resize((size[1], size[0]), Image.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32) / 255
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def square_photos(names: Sequence[str], size: int) -> Tensor:
    """Photographs centre-cropped square and resized, ``(N, 3, size, size)`` in [0, 1]."""
    from PIL import Image

    out = []
    for name in names:
        with Image.open(skimage_folder() / name) as image:
            w, h = image.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        box = (left / w, top / h, (left + side) / w, (top + side) / h)
        out.append(read_photo(name, box, (size, size)))
    return torch.stack(out)


def clutter_photos() -> list[Tensor]:
    """:data:`CLUTTER_PHOTOS` as ``(3, H, W)`` tensors in [0, 1], at their own sizes."""
    return [read_photo(name) for name in CLUTTER_PHOTOS]
