"""One-shot segmentation: exact masks on a toy model whose map is known in closed form.

The toy model's explained layer is a fixed 1x1 conv giving channels ``(x0, x1, 1)`` and
the embedding is their spatial mean. For a same-class pair the test image's map is then
``c * ReLU(x0 - area)`` when only channel 0 holds an object, i.e. exactly the object's
indicator after scaling; a test image without any object gets a map of zeros.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from simexplain.demo import SmallEmbeddingNet
from simexplain.errors import InputError
from simexplain.apps.segmentation import (
    SEGMENTATION_METHOD,
    MissingExtraError,
    binary_iou,
    grabcut_mask,
    segment,
    similarity_cue,
)
from model_state import unchanged

pytestmark = pytest.mark.usefixtures("one_thread")

SIDE = 16


def toy_model() -> nn.Module:
    conv = nn.Conv2d(3, 3, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[0, 0] = 1.0
        conv.weight[1, 1] = 1.0
        conv.bias[2] = 1.0
    return nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def image(a=None, b=None, side: int = SIDE) -> torch.Tensor:
    """Channel 0 holds object A's box ``(r0, r1, c0, c1)``, channel 1 object B's."""
    x = torch.zeros(3, side, side)
    if a is not None:
        x[0, a[0] : a[1], a[2] : a[3]] = 1.0
    if b is not None:
        x[1, b[0] : b[1], b[2] : b[3]] = 1.0
    return x


def box_mask(box, side: int = SIDE) -> torch.Tensor:
    m = torch.zeros(side, side, dtype=torch.bool)
    m[box[0] : box[1], box[2] : box[3]] = True
    return m


A_BOX, B_BOX = (2, 7, 3, 9), (9, 14, 8, 15)


@pytest.mark.parametrize("method", ["threshold", "grabcut"])
def test_pair_map_is_the_object_and_mask_is_exact(method):
    model = toy_model()
    test = image(a=A_BOX)
    support = image(a=(4, 10, 4, 10))
    with unchanged(model):
        result = segment(model, test, support, layer="0", mask=method)
    expected = box_mask(A_BOX)
    assert torch.equal(result.map, expected.float())
    assert torch.equal(result.mask, expected)
    assert result.mask_method == method and result.note == ""
    assert result.layer == "0"
    assert result.similarity.shape == (1,)


def test_the_cue_is_the_object_shared_with_the_support():
    model = toy_model()
    test = image(a=A_BOX, b=B_BOX)
    support, negative = image(a=(4, 10, 4, 10)), image(b=(4, 10, 4, 10))
    pair = segment(model, test, support, layer="0", mask="threshold")
    assert pair.method == SEGMENTATION_METHOD
    assert torch.equal(pair.mask, box_mask(A_BOX))
    triplet = segment(model, test, support, negative, layer="0", mask="grabcut")
    assert torch.equal(triplet.mask, box_mask(A_BOX))


def test_a_decomposition_gives_the_cue_in_closed_form():
    model = toy_model()
    test, support = image(a=A_BOX), image(a=(4, 10, 4, 10))
    with unchanged(model):
        result = segment(model, test, support, layer="0", mask="threshold", method="stylianou")
    # e_test(u, v) . f_support with f_support = (area, 0, 1): the object on a constant
    area = 36 / SIDE**2
    expected = (box_mask(A_BOX).float() * area + 1) / (area + 1)
    assert result.method == "stylianou"
    torch.testing.assert_close(result.map, expected)


def test_paper_sam_rewards_the_other_object_too_unless_it_is_a_negative():
    model = toy_model()
    test = image(a=A_BOX, b=B_BOX)
    support, negative = image(a=(4, 10, 4, 10)), image(b=(4, 10, 4, 10))
    pair = segment(model, test, support, layer="0", mask="threshold", method="sam")
    # A pair also rewards object B (shared "objectness"), at 0.79 of A's peak ...
    assert pair.map[box_mask(B_BOX)].min() > 0.7
    assert torch.equal(pair.mask, box_mask(A_BOX) | box_mask(B_BOX))
    # ... while the triplet with B as the negative keeps A only.
    triplet = segment(model, test, support, negative, layer="0", mask="grabcut", method="sam")
    assert torch.equal(triplet.map, box_mask(A_BOX).float())
    assert torch.equal(triplet.mask, box_mask(A_BOX))


def test_k_shot_averages_the_scaled_maps_and_resizes_supports():
    model = toy_model()
    test = image(a=A_BOX, b=B_BOX)
    supports = [image(a=(4, 10, 4, 10)), image(b=(2, 30, 2, 30), side=32)]  # other size
    maps, peaks, similarity, _ = similarity_cue(model, test, supports, layer="0")
    assert maps.shape == (2, SIDE, SIDE) and peaks.shape == (2,) and similarity.shape == (2,)
    result = segment(model, test, supports, layer="0", mask="threshold")
    mean = maps.mean(0)
    assert torch.allclose(result.map, mean / mean.max())
    batch = segment(model, test, torch.stack([supports[0], supports[0]]), layer="0")
    single = segment(model, test, supports[0], layer="0")
    assert torch.equal(batch.map, single.map) and torch.equal(batch.mask, single.mask)


def test_input_size_resizes_for_the_model_and_maps_back():
    model = toy_model()
    test = image(a=(4, 12, 4, 12))
    # paper SAM: on this toy both images hold only A, at other sizes (cosine-based maps then
    # point away from A: its share in the test image exceeds the support's)
    result = segment(model, test, image(a=(2, 9, 2, 9)), layer="0", input_size=(8, 8),
                     method="sam")
    assert result.mask.shape == (SIDE, SIDE) and result.map.shape == (SIDE, SIDE)
    assert binary_iou(result.mask, box_mask((4, 12, 4, 12))) > 0.6


def test_support_sharing_nothing_gives_an_empty_mask():
    model = toy_model()
    empty_test = image()  # no object at all: the map is zero everywhere
    result = segment(model, empty_test, image(a=(4, 10, 4, 10)), layer="0")
    assert result.mask_method == "empty" and "zero everywhere" in result.note
    assert not result.mask.any() and result.mask.shape == (SIDE, SIDE)
    assert not result.map.isnan().any()
    # min_similarity turns a weak match into an empty mask as well.
    test = image(b=B_BOX)
    weak = segment(model, test, image(a=(4, 10, 4, 10)), layer="0", min_similarity=0.999)
    assert weak.mask_method == "empty" and "min_similarity" in weak.note and not weak.mask.any()


def test_grabcut_refines_a_blurred_cue_to_the_object():
    g = torch.Generator().manual_seed(0)
    side = 40
    picture = 0.2 + 0.05 * torch.rand(3, side, side, generator=g)
    truth = box_mask((10, 26, 12, 30), side)
    picture[:, truth] = torch.tensor([0.9, 0.1, 0.1]).view(3, 1)
    kernel = torch.ones(1, 1, 9, 9) / 81
    cue = F.conv2d(truth.float()[None, None], kernel, padding=4)[0, 0]
    cue = F.conv2d(cue[None, None], kernel, padding=4)[0, 0]
    cue = cue / cue.max()
    mask, note = grabcut_mask(picture, cue, threshold=0.7)
    assert note == ""
    assert binary_iou(mask, truth) > 0.95
    assert binary_iou(mask, truth) > binary_iou(cue >= 0.7, truth) + 0.1


def test_grabcut_falls_back_when_seeds_hold_one_class():
    picture = torch.rand(3, 12, 12)
    everywhere = torch.ones(12, 12)
    mask, note = grabcut_mask(picture, everywhere)
    assert mask.all() and "no background seeds" in note


def test_missing_opencv_names_the_extra(monkeypatch):
    model = toy_model()
    monkeypatch.setitem(sys.modules, "cv2", None)
    match = r"seg extra \(pip install -e '\.\[seg\]'"
    with unchanged(model), pytest.raises(MissingExtraError, match=match):
        segment(model, image(a=A_BOX), image(a=A_BOX), layer="0")
    assert issubclass(MissingExtraError, InputError) and issubclass(MissingExtraError, ImportError)
    # The threshold method needs no OpenCV.
    assert segment(model, image(a=A_BOX), image(a=A_BOX), layer="0", mask="threshold").mask.any()


@pytest.mark.parametrize(
    "kwargs, supports, message",
    [
        ({"mask": "otsu"}, None, "mask must be one of"),
        ({"threshold": 0.9, "sure_foreground": 0.8}, None, "sure_background < threshold"),
        ({"grabcut_iters": 0}, None, "grabcut_iters"),
        ({}, torch.zeros(1, 3, 3, SIDE, SIDE), "pass one image"),
        ({}, [torch.zeros(SIDE, SIDE)], r"supports\[0\]"),
        ({}, torch.zeros(1, SIDE, SIDE), "channels"),
        ({}, torch.zeros(3, SIDE, SIDE, dtype=torch.uint8), "convert images to float"),
        ({}, [], "supports is empty"),
        ({"negatives": torch.zeros(2, 3, SIDE, SIDE)}, torch.zeros(3, 3, SIDE, SIDE), "negative"),
    ],
)
def test_bad_input_is_a_clear_error_and_leaves_the_model_alone(kwargs, supports, message):
    model = toy_model()
    supports = image(a=A_BOX) if supports is None else supports
    with unchanged(model), pytest.raises(InputError, match=message):
        segment(model, image(a=A_BOX), supports, layer="0", **kwargs)


def test_batch_of_test_images_is_refused():
    with pytest.raises(InputError, match="once per test image"):
        segment(toy_model(), torch.zeros(2, 3, SIDE, SIDE), image(a=A_BOX), layer="0")


def test_binary_iou_values_and_shape_check():
    a = box_mask((0, 4, 0, 4))
    b = box_mask((2, 6, 0, 4))
    assert float(binary_iou(a, b)) == pytest.approx(8 / 24)
    empty = torch.zeros(SIDE, SIDE, dtype=torch.bool)
    assert float(binary_iou(empty, empty)) == 1.0 and float(binary_iou(a, empty)) == 0.0
    with pytest.raises(InputError, match="differ in shape"):
        binary_iou(a, a[:3])


def test_real_cnn_in_train_mode_is_left_unchanged():
    model = SmallEmbeddingNet(embedding_dim=8, width=4).train()
    test, support, negative = torch.rand(3, 3, 32, 32)
    with unchanged(model):
        result = segment(model, test, support, negative)
    assert result.mask.shape == (32, 32) and result.mask_method in ("grabcut", "threshold", "empty")
    assert result.layer == "features"
    assert 0.0 <= float(result.map.min()) and float(result.map.max()) <= 1.0
