"""The offline datasets (generated shapes, Fashion-MNIST files) and the tuple sampler."""

import gzip
import struct

import numpy as np
import pytest
import torch

from simexplain import check_labels
from simexplain.data import (
    fashion_mnist_available,
    load_fashion_mnist,
    make_shapes,
    sample_tuples,
    to_rgb,
)


def test_make_shapes_is_deterministic_and_balanced():
    x, y = make_shapes(10, num_classes=4, image_size=32, seed=3)
    assert x.shape == (40, 3, 32, 32) and x.dtype == torch.float32
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert torch.bincount(y).tolist() == [10, 10, 10, 10]
    x2, y2 = make_shapes(10, num_classes=4, image_size=32, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, make_shapes(10, num_classes=4, image_size=32, seed=4)[0])


@pytest.mark.parametrize(
    "kind, count", [("same_pair", 2), ("different_pair", 2), ("triplet", 3), ("quadruplet", 4)]
)
def test_sample_tuples_respect_their_kind(kind, count):
    labels = torch.arange(5).repeat_interleave(4)
    tuples = sample_tuples(labels, kind, 50, torch.Generator().manual_seed(0))
    assert tuples.shape == (50, count)
    tuple_labels = labels[tuples]
    if kind == "same_pair":
        assert (tuple_labels[:, 0] == tuple_labels[:, 1]).all()
        assert (tuples[:, 0] != tuples[:, 1]).all()
    elif kind == "different_pair":
        assert (tuple_labels[:, 0] != tuple_labels[:, 1]).all()
    else:
        check_labels(tuple_labels, 50, count)  # raises on any inconsistent tuple


def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_load_fashion_mnist_from_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("t10k", 3)):
        images = rng.integers(0, 256, (count, 28, 28))
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(count) % 10)
    assert fashion_mnist_available(str(tmp_path))
    x, y = load_fashion_mnist(str(tmp_path), train=True, limit=4)
    assert x.shape == (4, 1, 28, 28) and float(x.max()) <= 1
    assert y.tolist() == [0, 1, 2, 3]
    assert to_rgb(x, 48).shape == (4, 3, 48, 48)


def test_load_fashion_mnist_missing_names_the_package(tmp_path):
    assert not fashion_mnist_available(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist(str(tmp_path))


@pytest.mark.skipif(
    not fashion_mnist_available(), reason="Debian's dataset-fashion-mnist not installed"
)
def test_real_fashion_mnist():
    x, y = load_fashion_mnist(train=False, limit=100)
    assert x.shape == (100, 1, 28, 28) and y.max() <= 9
