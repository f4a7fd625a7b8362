"""scikit-image's photographs, read offline without importing scikit-image."""

import importlib.util

import pytest
import torch

import simexplain.data.photos as photos
from simexplain.errors import MissingExtraError

needs_skimage = pytest.mark.skipif(
    importlib.util.find_spec("skimage") is None, reason="needs scikit-image (the demo extra)"
)


@needs_skimage
def test_square_photos_are_rgb_in_the_unit_interval():
    images = photos.square_photos(photos.OBJECT_PHOTOS, 32)
    assert images.shape == (len(photos.OBJECT_PHOTOS), 3, 32, 32)
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    grey = images[photos.OBJECT_PHOTOS.index("camera.png")]  # a grey photo, made RGB
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


@needs_skimage
def test_read_photo_crops_and_resizes():
    whole = photos.read_photo("chelsea.png")
    assert whole.shape == (3, 300, 451)
    left = photos.read_photo("chelsea.png", (0.0, 0.0, 0.5, 1.0), (20, 10))
    assert left.shape == (3, 20, 10)
    assert [tuple(p.shape[:1]) for p in photos.clutter_photos()] == [(3,)] * 6


def test_without_scikit_image_the_error_names_the_extra(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingExtraError, match=r"scikit-image is not installed.*\.\[demo\]"):
        photos.read_photo("chelsea.png")
