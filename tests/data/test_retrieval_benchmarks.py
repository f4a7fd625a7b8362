"""Class splits of the retrieval benchmarks, read from tiny fake folder trees."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from simexplain import InputError
from simexplain.data import fashion_mnist_available
from simexplain.data import (
    cars196_split,
    cub200_split,
    fashion_mnist_split,
    load_images,
    load_split,
    sop_split,
)


def touch_image(path, size=(6, 4), colour=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def names(paths):
    return [p.split("/")[-1] for p in paths]


# -- CUB-200-2011 --------------------------------------------------------------------------


def make_cub(root, with_listing=True):
    folders = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross",
               "004.Groove_billed_Ani"]
    for i, folder in enumerate(folders):
        for j in range(i + 1):  # class i has i + 1 images
            touch_image(root / "images" / folder / f"c{i}_{j}.jpg")
    (root / "images" / folders[0] / "notes.txt").write_text("not an image")
    if with_listing:  # deliberately out of order: the ids decide
        lines = [f"{i + 1} {f}" for i, f in enumerate(folders)]
        (root / "classes.txt").write_text("\n".join(reversed(lines)) + "\n")


@pytest.mark.parametrize("with_listing", [True, False])
def test_cub_first_half_of_classes_trains(tmp_path, with_listing):
    make_cub(tmp_path / "CUB_200_2011", with_listing)
    split = cub200_split(tmp_path)  # the parent folder is accepted too
    assert split.class_names == ["Black footed Albatross", "Laysan Albatross",
                                 "Sooty Albatross", "Groove billed Ani"]
    assert split.train_labels == [0, 1, 1]
    assert names(split.train_paths) == ["c0_0.jpg", "c1_0.jpg", "c1_1.jpg"]
    assert split.test_labels == [2, 2, 2, 3, 3, 3, 3]
    assert names(split.test_paths)[:3] == ["c2_0.jpg", "c2_1.jpg", "c2_2.jpg"]
    assert all(p.startswith(str(tmp_path)) for p in split.test_paths)
    assert "3 train images of 2 classes" in repr(split)


def test_cub_errors(tmp_path):
    with pytest.raises(InputError, match="images/ folder"):
        cub200_split(tmp_path)
    make_cub(tmp_path)
    (tmp_path / "classes.txt").write_text("1 001.Black_footed_Albatross\n2 999.Missing\n")
    with pytest.raises(InputError, match="999.Missing"):
        cub200_split(tmp_path)
    (tmp_path / "classes.txt").write_text("one two three\n")
    with pytest.raises(InputError, match="class id"):
        cub200_split(tmp_path)


# -- Cars196 -------------------------------------------------------------------------------


def struct_array(rows, fields):
    table = np.empty(len(rows), dtype=[(f, "O") for f in fields])
    for i, row in enumerate(rows):
        table[i] = row
    return table


def test_cars_original_layout(tmp_path):
    savemat = pytest.importorskip("scipy.io").savemat
    rows = [("car_ims/000001.jpg", 1, 0), ("car_ims/000002.jpg", 3, 1),
            ("car_ims/000003.jpg", 2, 1), ("car_ims/000004.jpg", 4, 0)]
    savemat(tmp_path / "cars_annos.mat", {
        "annotations": struct_array(rows, ("relative_im_path", "class", "test")),
        "class_names": np.array(["AM General", "Acura RL", "Acura TL", "Audi A4"], dtype=object),
    })
    split = cars196_split(tmp_path)
    assert split.class_names == ["AM General", "Acura RL", "Acura TL", "Audi A4"]
    assert (names(split.train_paths), split.train_labels) == (["000001.jpg", "000003.jpg"], [0, 1])
    assert (names(split.test_paths), split.test_labels) == (["000002.jpg", "000004.jpg"], [2, 3])
    assert split.train_paths[0] == str((tmp_path / "car_ims" / "000001.jpg").resolve())


def test_cars_torchvision_layout(tmp_path):
    savemat = pytest.importorskip("scipy.io").savemat
    base = tmp_path / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    savemat(base / "devkit" / "cars_meta.mat",
            {"class_names": np.array(["A", "B", "C", "D"], dtype=object)})
    savemat(base / "devkit" / "cars_train_annos.mat",
            {"annotations": struct_array([("00001.jpg", 4), ("00002.jpg", 1)], ("fname", "class"))})
    savemat(base / "cars_test_annos_withlabels.mat",
            {"annotations": struct_array([("00001.jpg", 2)], ("fname", "class"))})
    split = cars196_split(tmp_path)
    assert split.train_labels == [0, 1] and split.test_labels == [3]
    assert split.train_paths[0].endswith("stanford_cars/cars_train/00002.jpg")
    assert split.train_paths[1].endswith("stanford_cars/cars_test/00001.jpg")
    assert split.test_paths[0].endswith("stanford_cars/cars_train/00001.jpg")


def test_cars_errors(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="cars_annos.mat"):
        cars196_split(tmp_path)
    (tmp_path / "cars_annos.mat").write_bytes(b"")
    if importlib.util.find_spec("scipy") is not None:
        with pytest.raises(InputError, match="could not read"):
            cars196_split(tmp_path)
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # as if scipy were not installed
    with pytest.raises(InputError, match="needs scipy"):
        cars196_split(tmp_path)


# -- Stanford Online Products --------------------------------------------------------------


def test_sop_uses_its_own_files(tmp_path):
    header = "image_id class_id super_class_id path\n"
    (tmp_path / "Ebay_train.txt").write_text(
        header + "1 1 1 bicycle_final/a.JPG\n2 1 1 bicycle_final/b.JPG\n3 5 2 chair_final/c.JPG\n"
    )
    (tmp_path / "Ebay_test.txt").write_text(header + "4 9 1 bicycle_final/d.JPG\n\n")
    split = load_split("sop", tmp_path)
    assert split.train_labels == [0, 0, 1] and split.test_labels == [2]
    assert split.class_names == ["product 1", "product 5", "product 9"]
    assert split.test_paths == [str((tmp_path / "bicycle_final" / "d.JPG").resolve())]
    (tmp_path / "Ebay_test.txt").write_text(header + "4 9 bicycle_final/d.JPG\n")
    with pytest.raises(InputError, match="line 2"):
        sop_split(tmp_path)
    (tmp_path / "Ebay_test.txt").write_text("4 9 1 bicycle_final/d.JPG\n")
    with pytest.raises(InputError, match="header"):
        sop_split(tmp_path)
    with pytest.raises(InputError, match="Ebay_train.txt"):
        sop_split(tmp_path / "elsewhere")
    with pytest.raises(InputError, match="unknown dataset"):
        load_split("imagenet", tmp_path)


# -- Fashion-MNIST and image loading -------------------------------------------------------


@pytest.mark.skipif(not fashion_mnist_available(), reason="Fashion-MNIST not installed")
def test_fashion_mnist_split_by_class():
    split = fashion_mnist_split(train_limit=300, test_limit=200)
    assert split.train_images.shape == (300, 1, 28, 28)
    assert split.test_images.shape == (200, 1, 28, 28)
    assert set(split.train_labels.tolist()) == {0, 1, 2, 3, 4}
    assert set(split.test_labels.tolist()) == {5, 6, 7, 8, 9}
    assert split.class_names[5] == "Sandal"


def test_load_images_resizes_and_crops(tmp_path):
    touch_image(tmp_path / "wide.png", size=(40, 20), colour=(255, 0, 0))
    touch_image(tmp_path / "grey.png", size=(10, 30), colour=(0, 0, 255))
    Image.open(tmp_path / "grey.png").convert("L").save(tmp_path / "grey.png")
    images = load_images([tmp_path / "wide.png", tmp_path / "grey.png"], size=8)
    assert images.shape == (2, 3, 8, 8) and images.dtype == torch.float32
    torch.testing.assert_close(images[0, 0], torch.ones(8, 8))
    torch.testing.assert_close(images[0, 1:], torch.zeros(2, 8, 8))
    assert images[1].std() < 1e-6 and 0 < float(images[1, 0, 0, 0]) < 0.5  # blue as grey
