"""Image files: finding them in folders (labels from class sub-folders) and reading them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError

__all__ = ["IMAGE_EXTENSIONS", "list_images", "list_labelled_images", "load_images"]

#: File extensions :func:`list_images` treats as images.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def list_images(directory: "str | os.PathLike[str]") -> list[Path]:
    """The image files directly inside ``directory``, sorted by name.

    Raises:
        InputError: the directory does not exist, is a file, or holds no image file.
    """
    folder = Path(directory)
    if folder.is_file():
        raise InputError(f"{folder} is a file, not a folder; give the folder that holds the "
                         "images")
    if not folder.is_dir():
        raise InputError(f"image folder not found: {folder}")
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise InputError(
            f"no image files in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return files


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def list_labelled_images(
    sources: "Sequence[str | os.PathLike[str]] | str | os.PathLike[str]",
) -> tuple[list[Path], list[Optional[str]]]:
    """Image files and their labels, taken from the names of class folders.

    Each source is an image file (no label) or a folder: the images directly inside it
    have no label, and the images in each of its sub-folders are labelled with that
    sub-folder's name (``gallery/cat/1.jpg`` is a ``cat``). Images are sorted by path.

    Raises:
        InputError: a source does not exist, is not an image, or no image was found.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> root = Path(tempfile.mkdtemp())
        >>> for name in ("cat/1.png", "dog/2.png", "3.png"):
        ...     (root / name).parent.mkdir(exist_ok=True)
        ...     Image.new("RGB", (8, 8)).save(root / name)
        >>> paths, labels = list_labelled_images(root)
        >>> [p.relative_to(root).as_posix() for p in paths], labels
        (['3.png', 'cat/1.png', 'dog/2.png'], [None, 'cat', 'dog'])
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    found: list[tuple[Path, Optional[str]]] = []
    for source in map(Path, sources):
        if source.is_file():
            if source.suffix.lower() not in IMAGE_EXTENSIONS:
                raise InputError(
                    f"{source} is not an image file (expected {', '.join(IMAGE_EXTENSIONS)})"
                )
            found.append((source, None))
        elif source.is_dir():
            for entry in sorted(source.iterdir()):
                if _is_image(entry):
                    found.append((entry, None))
                elif entry.is_dir():
                    found += [(p, entry.name) for p in sorted(entry.iterdir()) if _is_image(p)]
        else:
            raise InputError(f"image file or folder not found: {source}")
    if not found:
        names = ", ".join(str(s) for s in sources) or "(nothing given)"
        raise InputError(
            f"no image files in {names} or its class sub-folders "
            f"(looked for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return [p for p, _ in found], [label for _, label in found]


def load_images(paths: Sequence["str | os.PathLike[str]"], size: int) -> Tensor:
    """Read images as RGB, resize the short side to ``size`` and centre-crop to a square.

    Returns a float tensor ``(N, 3, size, size)`` in [0, 1] (it holds every image:
    ``N * 3 * size**2 * 4`` bytes).
    """
    from PIL import Image

    out = torch.empty(len(paths), 3, size, size)
    for i, path in enumerate(paths):
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        scale = size / min(rgb.size)
        width, height = max(size, round(rgb.width * scale)), max(size, round(rgb.height * scale))
        left, top = (width - size) // 2, (height - size) // 2
        square = rgb.resize((width, height), Image.BILINEAR, reducing_gap=3.0).crop(
            (left, top, left + size, top + size)
        )
        out[i] = torch.from_numpy(np.asarray(square, dtype=np.float32) / 255).permute(2, 0, 1)
    return out
