"""What a gallery can be given as, read the same way: batches of images by rows.

A tensor of images, a map-style ``Dataset`` (items an image tensor or a tuple whose first
element is the image and second its label), a ``DataLoader`` over such a dataset (its
batch size and workers are used; its order is the dataset's), or image files: a folder
(labels from class sub-folders), a list of files and folders. Files are read and
preprocessed by a ``DataLoader`` with workers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ...data.image_files import list_labelled_images
from ...data.preprocessing import Preprocessing, load_image, resolve_preprocessing
from ...errors import InputError
from ..gallery import tensor_sha256

__all__ = ["GallerySource", "gallery_source"]

GalleryLike = Union[Tensor, Dataset, DataLoader, str, "os.PathLike[str]", Sequence[Any]]


class _Files(Dataset):
    def __init__(self, paths: Sequence[Path], preprocessing: Preprocessing) -> None:
        self.paths, self.preprocessing = list(paths), preprocessing

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        return self.preprocessing.transform(load_image(self.paths[index]))


class _Images(Dataset):
    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return self.images[index]


def _stamp(path: Path) -> list[Any]:
    status = path.stat()
    return [str(path.resolve()), status.st_size, status.st_mtime_ns]


def _collate(items: list[Any]) -> tuple[Tensor, Optional[list[Any]]]:
    if isinstance(items[0], Tensor):
        return torch.stack(items), None
    if isinstance(items[0], (tuple, list)) and items[0] and isinstance(items[0][0], Tensor):
        labels = [item[1] if len(item) > 1 else None for item in items]
        labels = [int(x) if isinstance(x, Tensor) and x.numel() == 1 else x for x in labels]
        return torch.stack([item[0] for item in items]), labels
    raise InputError(
        f"gallery items must be image tensors or (image, label) tuples, got "
        f"{type(items[0]).__name__}"
    )


class GallerySource:
    """A gallery's images, names and labels (when the source has them).

    Attributes:
        dataset: items by row.
        names: a name per row (file paths, or ``"0"``, ``"1"``, ...).
        labels: a label per row from the source (folder names, dataset items), or ``None``.
        preprocessing: how files were turned into tensors (for display), or ``None``.
        batch_size, num_workers: how batches are read.
    """

    def __init__(
        self,
        dataset: Dataset,
        names: list[str],
        labels: Optional[list[Any]],
        preprocessing: Optional[Preprocessing],
        batch_size: int,
        num_workers: int,
    ) -> None:
        self.dataset, self.names, self.labels = dataset, names, labels
        self.preprocessing = preprocessing
        self.batch_size, self.num_workers = batch_size, num_workers

    def __len__(self) -> int:
        return len(self.names)

    def batches(self, rows: Sequence[int]) -> Iterator[tuple[Tensor, Optional[list[Any]]]]:
        """``(images, labels or None)`` batches of ``rows`` (e.g. ``range(start, stop)``),
        in that order."""
        loader = DataLoader(Subset(self.dataset, rows), batch_size=self.batch_size,
                            shuffle=False, num_workers=self.num_workers, collate_fn=_collate)
        yield from loader

    def identity(self) -> dict[str, Any]:
        """What tells this gallery from another with as many rows: for image files each
        one's resolved path, size and modification time (``stamps``) and the
        preprocessing, ``recognisable`` unless its description holds a memory address
        (as a lambda's does); for a tensor a SHA-256 of its contents. A Dataset is known
        by its length alone."""
        if isinstance(self.dataset, _Files):
            preprocessing = self.dataset.preprocessing
            described = repr(preprocessing.transform)
            return {"stamps": [_stamp(path) for path in self.dataset.paths],
                    "preprocessing": [described, list(preprocessing.mean),
                                      list(preprocessing.std)],
                    "recognisable": " at 0x" not in described}
        if isinstance(self.dataset, _Images):
            return {"content_sha256": tensor_sha256(self.dataset.images)}
        return {}

    def images(self, rows: Sequence[int]) -> Tensor:
        """The images of ``rows`` ``(n, C, H, W)``, e.g. to show a query's matches."""
        return _collate([self.dataset[int(r)] for r in rows])[0]


def gallery_source(
    gallery: GalleryLike,
    model: nn.Module,
    *,
    transform: Any = None,
    batch_size: int = 32,
    num_workers: int = 0,
) -> GallerySource:
    """A :class:`GallerySource` for any of the forms in the module docs.

    Example:
        >>> source = gallery_source(torch.zeros(5, 3, 8, 8), torch.nn.Identity())
        >>> len(source), [tuple(b.shape) for b, _ in source.batches(range(1, 5))]
        (5, [(4, 3, 8, 8)])
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be a positive number of images, got {batch_size}")
    if isinstance(gallery, Tensor):
        if gallery.dim() != 4 or gallery.shape[0] == 0:
            raise InputError(f"a gallery tensor must be images (G, C, H, W), got shape "
                             f"{tuple(gallery.shape)}")
        names = [str(i) for i in range(gallery.shape[0])]
        return GallerySource(_Images(gallery), names, None, None, batch_size, 0)
    if isinstance(gallery, DataLoader):
        if gallery.batch_size is not None:
            batch_size = gallery.batch_size
        return gallery_source(gallery.dataset, model, batch_size=batch_size,
                              num_workers=gallery.num_workers)
    if isinstance(gallery, Dataset) and hasattr(gallery, "__len__"):
        count = len(gallery)  # type: ignore[arg-type]
        if count == 0:
            raise InputError("the gallery dataset is empty")
        names = [str(i) for i in range(count)]
        return GallerySource(gallery, names, None, None, batch_size, num_workers)
    if isinstance(gallery, (str, os.PathLike)) or (
        isinstance(gallery, (list, tuple)) and gallery
        and all(isinstance(g, (str, os.PathLike)) for g in gallery)
    ):
        paths, labels = list_labelled_images(gallery)
        preprocessing = resolve_preprocessing(model, transform)
        has_labels = any(label is not None for label in labels)
        return GallerySource(_Files(paths, preprocessing), [str(p) for p in paths],
                             labels if has_labels else None, preprocessing, batch_size,
                             num_workers)
    raise InputError(
        f"gallery must be images (G, C, H, W), a Dataset, a DataLoader, or a folder or list "
        f"of image files; got {type(gallery).__name__}"
    )
