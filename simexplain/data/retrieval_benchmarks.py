"""Class splits of the deep metric learning benchmarks, read from their standard folders.

Retrieval benchmarks train on some classes and test on others, never seen in training:

* CUB-200-2011: the first 100 of the 200 bird classes train, the last 100 test
  (:func:`cub200_split`);
* Cars196: the first 98 car models train, the last 98 test (:func:`cars196_split`);
* Stanford Online Products: its own ``Ebay_train.txt`` / ``Ebay_test.txt`` (:func:`sop_split`).

(Fashion-MNIST, a small offline stand-in: :func:`simexplain.data.fashion_mnist_split`.)

The folder readers return file paths and labels (:class:`FileSplit`); nothing is
downloaded. :func:`simexplain.data.load_images` turns paths into a tensor for small
experiments. Labels are class indices into ``class_names``, so train and test labels
never overlap.

pytorch-metric-learning's dataset classes read the same splits but fewer layouts (its
Cars196 only a Kaggle repackaging, its CUB only with ``images.txt``), give 1-based class
ids without names, and are an optional dependency; these readers stay.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

from ..errors import InputError
from .image_files import IMAGE_EXTENSIONS

__all__ = [
    "DATASETS",
    "FileSplit",
    "cars196_split",
    "cub200_split",
    "load_split",
    "sop_split",
]

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class FileSplit:
    """Image files and labels of a train/test class split.

    Attributes:
        train_paths, test_paths: absolute paths of the images.
        train_labels, test_labels: class indices into ``class_names``; no class is in both.
        class_names: the name of every class, in label order.
    """

    train_paths: list[str]
    train_labels: list[int]
    test_paths: list[str]
    test_labels: list[int]
    class_names: list[str]

    def __repr__(self) -> str:
        return (
            f"FileSplit({len(self.train_paths)} train images of "
            f"{len(set(self.train_labels))} classes, {len(self.test_paths)} test images of "
            f"{len(set(self.test_labels))} classes)"
        )


def _first_half_split(
    items: Sequence[tuple[str, int]], class_names: list[str], dataset: str
) -> FileSplit:
    """Classes ``[0, n/2)`` train, ``[n/2, n)`` test (n = number of classes)."""
    if not items:
        raise InputError(f"no {dataset} images found")
    half = len(class_names) // 2
    train = [(p, y) for p, y in items if y < half]
    test = [(p, y) for p, y in items if y >= half]
    return FileSplit(
        [p for p, _ in train], [y for _, y in train],
        [p for p, _ in test], [y for _, y in test], class_names,
    )


def _missing(dataset: str, root: Path, expected: str) -> InputError:
    return InputError(
        f"{root} does not look like {dataset}: expected {expected}. Pass the folder that "
        f"holds it (the dataset is not downloaded for you)"
    )


# --------------------------------------------------------------------------- CUB-200-2011


def cub200_split(root: PathLike) -> FileSplit:
    """CUB-200-2011 from ``root/images/NNN.Name/*.jpg`` (``root`` or ``root/CUB_200_2011``).

    The class order is that of ``classes.txt`` (``"1 001.Black_footed_Albatross"`` per
    line) when present, else the sorted folder names. Classes 1-100 train, 101-200 test.
    """
    base = Path(root)
    if not (base / "images").is_dir() and (base / "CUB_200_2011" / "images").is_dir():
        base = base / "CUB_200_2011"
    images = base / "images"
    if not images.is_dir():
        raise _missing("CUB-200-2011", base, "an images/ folder with one folder per class")
    listing = base / "classes.txt"
    if listing.is_file():
        entries = [line.split() for line in listing.read_text().splitlines() if line.strip()]
        if any(len(e) != 2 or not e[0].isdigit() for e in entries):
            raise InputError(f"{listing}: every line must be '<class id> <folder name>'")
        folders = [name for _, name in sorted(entries, key=lambda e: int(e[0]))]
    else:
        folders = sorted(p.name for p in images.iterdir() if p.is_dir())
    items = []
    for label, folder in enumerate(folders):
        directory = images / folder
        if not directory.is_dir():
            raise InputError(f"{listing} names class folder {folder!r}, missing under {images}")
        items += [(str(p.resolve()), label) for p in sorted(directory.iterdir())
                  if p.suffix.lower() in IMAGE_EXTENSIONS]
    names = [re.sub(r"^\d+\.", "", f).replace("_", " ") for f in folders]
    return _first_half_split(items, names, "CUB-200-2011")


# --------------------------------------------------------------------------- Cars196


def _loadmat(path: Path) -> dict:
    try:
        from scipy.io import loadmat
        from scipy.io.matlab import MatReadError
    except ImportError as exc:
        raise InputError(
            f"reading Cars196's {path.name} needs scipy (pip install scipy)"
        ) from exc
    try:
        return loadmat(str(path), squeeze_me=True)
    except (MatReadError, ValueError, OSError) as exc:  # a damaged or truncated file
        raise InputError(f"could not read {path}: {exc}") from exc


def _records(table: Any) -> list[dict[str, Any]]:
    """The rows of a MATLAB struct array (as loadmat returns it) as dicts."""
    rows = table if getattr(table, "ndim", 1) else [table]  # squeeze_me makes 1 row a scalar
    return [{name: row[name] for name in row.dtype.names} for row in rows]


def _names(values: Any) -> list[str]:
    if isinstance(values, str) or not getattr(values, "ndim", 1):
        values = [values]
    return [str(v) for v in values]


def cars196_split(root: PathLike) -> FileSplit:
    """Cars196 (Stanford Cars) in either of its two common layouts.

    * ``root/cars_annos.mat`` with ``root/car_ims/*.jpg`` (the original release);
    * torchvision's ``StanfordCars`` layout: ``root/stanford_cars/`` (or ``root``) with
      ``devkit/cars_meta.mat``, ``devkit/cars_train_annos.mat``, ``cars_train/``,
      ``cars_test_annos_withlabels.mat`` and ``cars_test/``.

    Both official train and test images are used; classes 1-98 train, 99-196 test.
    Reading the ``.mat`` files needs scipy.
    """
    base = Path(root)
    if (base / "cars_annos.mat").is_file():
        table = _loadmat(base / "cars_annos.mat")
        names = _names(table["class_names"])
        items = [(str((base / str(r["relative_im_path"])).resolve()), int(r["class"]) - 1)
                 for r in _records(table["annotations"])]
        return _first_half_split(items, names, "Cars196")
    if not (base / "devkit").is_dir() and (base / "stanford_cars" / "devkit").is_dir():
        base = base / "stanford_cars"
    meta = base / "devkit" / "cars_meta.mat"
    if not meta.is_file():
        raise _missing("Cars196", base, "cars_annos.mat + car_ims/, or torchvision's "
                       "stanford_cars/ folder with devkit/cars_meta.mat")
    names = _names(_loadmat(meta)["class_names"])
    items = []
    for listing, folder in ((base / "devkit" / "cars_train_annos.mat", "cars_train"),
                            (base / "cars_test_annos_withlabels.mat", "cars_test")):
        if not listing.is_file():
            raise _missing("Cars196", base, str(listing.relative_to(base)))
        items += [(str((base / folder / str(r["fname"])).resolve()), int(r["class"]) - 1)
                  for r in _records(_loadmat(listing)["annotations"])]
    return _first_half_split(items, names, "Cars196")


# --------------------------------------------------------------------------- SOP


def _read_ebay(path: Path) -> list[tuple[str, int]]:
    lines = path.read_text().splitlines()
    if not lines or lines[0].split()[:2] != ["image_id", "class_id"]:
        raise InputError(f"{path}: expected the header 'image_id class_id super_class_id path'")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 4 or not fields[1].isdigit():
            raise InputError(f"{path}, line {number}: expected 4 fields, got {line!r}")
        rows.append((str((path.parent / fields[3]).resolve()), int(fields[1])))
    return rows


def sop_split(root: PathLike) -> FileSplit:
    """Stanford Online Products from ``root/Ebay_train.txt`` and ``root/Ebay_test.txt``.

    The official split (11,318 train and 11,316 test products); the class ids of the
    files (1-based) become labels 0, 1, ... in order, train classes first.
    """
    base = Path(root)
    if not (base / "Ebay_train.txt").is_file() and (
        base / "Stanford_Online_Products" / "Ebay_train.txt"
    ).is_file():
        base = base / "Stanford_Online_Products"
    files = [base / "Ebay_train.txt", base / "Ebay_test.txt"]
    if not all(f.is_file() for f in files):
        raise _missing("Stanford Online Products", base, "Ebay_train.txt and Ebay_test.txt")
    train, test = (_read_ebay(f) for f in files)
    ids = sorted({y for _, y in train}) + sorted({y for _, y in test} - {y for _, y in train})
    index = {class_id: i for i, class_id in enumerate(ids)}
    return FileSplit(
        [p for p, _ in train], [index[y] for _, y in train],
        [p for p, _ in test], [index[y] for _, y in test],
        [f"product {class_id}" for class_id in ids],
    )


# --------------------------------------------------------------------------- loading


#: The folder datasets :func:`load_split` knows, by name.
DATASETS = {"cub200": cub200_split, "cars196": cars196_split, "sop": sop_split}


def load_split(name: str, root: PathLike) -> FileSplit:
    """The class split of ``name`` (``"cub200"``, ``"cars196"`` or ``"sop"``) under ``root``."""
    if name not in DATASETS:
        raise InputError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name](root)
