"""Map-guided cropping and its random-crop control (issue 24, item 2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from model_state import assert_unchanged, snapshot
from networks import small_net
from simexplain import EmbeddingAttribution, InputError
from simexplain.training import SAMLoss
from simexplain.training.map_crops import crop_and_resize, map_boxes, random_boxes

SIZE = 12


def test_map_boxes_exact():
    maps = torch.zeros(3, 4, 4)
    maps[0, 1:3, 0] = 1.0  # rows 1-2 of column 0: at 4 x 4, the box is exact
    maps[1, 3, 3] = 2.0
    maps[1, 0, 0] = 1.0  # half the maximum: inside at threshold 0.5 only
    boxes = map_boxes(maps, (4, 4), threshold=0.5)
    torch.testing.assert_close(boxes, torch.tensor([[0.25, 0.0, 0.75, 0.25],
                                                    [0.0, 0.0, 1.0, 1.0],
                                                    [0.0, 0.0, 1.0, 1.0]]))  # all zero: whole
    torch.testing.assert_close(map_boxes(maps, (4, 4), threshold=0.6)[1],
                               torch.tensor([0.75, 0.75, 1.0, 1.0]))


def test_crop_of_the_whole_image_is_the_image_and_half_is_a_zoom():
    images = torch.randn(2, 3, 8, 8)
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    torch.testing.assert_close(crop_and_resize(images, whole), images)
    quarter = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])
    crops = crop_and_resize(images, quarter)
    # a quarter of the image zoomed 2x is that quarter of the whole image zoomed 2x
    zoomed = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(crops[0], zoomed[0, :, :8, :8])
    torch.testing.assert_close(crops[1], zoomed[1, :, 8:, 8:])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0.05, 1), st.floats(0.05, 1)),
                min_size=1, max_size=6), st.integers(0, 100))
def test_random_boxes_keep_sizes_and_stay_inside(raw, seed):
    boxes = torch.tensor([[top * (1 - h), left * (1 - w), top * (1 - h) + h, left * (1 - w) + w]
                          for top, left, h, w in raw])
    moved = random_boxes(boxes, torch.Generator().manual_seed(seed))
    torch.testing.assert_close(moved[:, 2:] - moved[:, :2], boxes[:, 2:] - boxes[:, :2])
    assert (moved >= -1e-6).all() and (moved <= 1 + 1e-6).all()
    again = random_boxes(boxes, torch.Generator().manual_seed(seed))
    torch.testing.assert_close(moved, again)


def crop_spy(monkeypatch) -> list:
    from simexplain.training import map_crops

    seen = []
    real = map_crops.crop_and_resize

    def spy(images, boxes, size=None):
        seen.append(boxes.clone())
        return real(images, boxes, size)

    monkeypatch.setattr(map_crops, "crop_and_resize", spy)
    return seen


def test_crop_loss_is_the_metric_loss_on_crops_around_the_attribution_maps(one_thread):
    """Tuples of images: every image is in one tuple, so its crop's box is that of its
    own attribution map, and L = L_ml + gamma * L_ml(crops)."""
    torch.manual_seed(0)
    model = small_net()
    slots = tuple(torch.randn(4, 3, SIZE, SIZE) for _ in range(3))
    metric = nn.TripletMarginLoss(margin=0.3)
    criterion = SAMLoss(model, metric, gamma=0.7, layer="3", augmentation="crop",
                        crop_threshold=0.4)
    total = criterion(slots)
    maps = EmbeddingAttribution(model, "3").attribute_tuples(slots).maps  # (B, T, h, w)
    boxes = map_boxes(maps.transpose(0, 1).reshape(-1, SIZE, SIZE), (SIZE, SIZE), 0.4)
    assert (boxes[:, 2:] - boxes[:, :2] < 1).any(), "the test needs maps that crop"
    crops = crop_and_resize(torch.cat(slots), boxes)
    with torch.no_grad():
        on_crops = metric(*model(crops).reshape(3, 4, -1).unbind(0))
        plain = metric(*model(torch.cat(slots)).reshape(3, 4, -1).unbind(0))
    parts = criterion.last
    torch.testing.assert_close(parts.mining, on_crops)
    torch.testing.assert_close(parts.metric, plain)
    torch.testing.assert_close(total.detach(), plain + 0.7 * on_crops)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    torch.testing.assert_close(parts.erased, 1 - areas.mean())


def test_random_crops_have_the_map_crops_sizes(one_thread, monkeypatch):
    torch.manual_seed(0)
    model = small_net()
    slots = tuple(torch.randn(4, 3, SIZE, SIZE) for _ in range(3))
    seen = crop_spy(monkeypatch)
    for mode in ("crop", "random_crop"):
        torch.manual_seed(5)
        SAMLoss(model, nn.TripletMarginLoss(), layer="3", augmentation=mode)(slots)
    chosen, moved = seen
    torch.testing.assert_close(moved[:, 2:] - moved[:, :2], chosen[:, 2:] - chosen[:, :2])
    assert not torch.allclose(moved, chosen)


def test_crop_batch_mode_images_outside_the_mined_tuples_are_kept_whole(one_thread,
                                                                        monkeypatch):
    from pytorch_metric_learning import losses

    model = small_net()
    images = torch.randn(6, 3, SIZE, SIZE)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    a, p, n = torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([2, 0])
    seen = crop_spy(monkeypatch)
    criterion = SAMLoss(model, losses.TripletMarginLoss(), gamma=1.0, layer="3",
                        augmentation="crop", max_mining_tuples=10)
    criterion(images, labels, (a, p, n))
    (boxes,) = seen
    torch.testing.assert_close(boxes[4:], torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2))
    assert criterion.last.mining_tuples == 2


def test_crop_step_leaves_running_statistics_to_the_unmasked_batch(one_thread):
    model = small_net(batch_norm=True).train()
    reference = small_net(batch_norm=True).train()
    reference.load_state_dict(model.state_dict())
    slots = tuple(torch.randn(4, 3, SIZE, SIZE) for _ in range(3))
    before = snapshot(model)
    SAMLoss(model, nn.TripletMarginLoss(), layer="3", augmentation="crop")(slots).backward()
    with torch.no_grad():
        reference(torch.cat(slots))
    for name, buffer in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], buffer, msg=name)
    assert all(p.grad is not None for p in model.parameters())
    for p in model.parameters():
        p.grad = None
    before["buffers"] = snapshot(model)["buffers"]
    assert_unchanged(model, before)


def test_crop_trains_through_the_crops_not_the_maps(one_thread):
    """The boxes are chosen without a graph: the crop term's gradient is that of the metric
    loss on fixed crops."""
    torch.manual_seed(2)
    model = small_net().double()
    slots = tuple(torch.randn(4, 3, SIZE, SIZE, dtype=torch.float64) for _ in range(3))
    metric = nn.TripletMarginLoss(margin=1.0)
    loss = SAMLoss(model, metric, gamma=1.0, layer="3", augmentation="crop")(slots)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    maps = EmbeddingAttribution(model, "3").attribute_tuples(slots).maps
    boxes = map_boxes(maps.transpose(0, 1).reshape(-1, SIZE, SIZE), (SIZE, SIZE), 0.5)
    images = torch.cat(slots)
    crops = crop_and_resize(images, boxes)
    expected = (metric(*model(images).reshape(3, 4, -1).unbind(0))
                + metric(*model(crops).reshape(3, 4, -1).unbind(0)))
    for got, want in zip(grads, torch.autograd.grad(expected, list(model.parameters()))):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"augmentation": "blur"}, "augmentation"), ({"crop_threshold": 0}, "crop_threshold"),
     ({"crop_threshold": 1.5}, "crop_threshold")],
)
def test_bad_crop_options(kwargs, message):
    with pytest.raises(InputError, match=message):
        SAMLoss(small_net(), nn.TripletMarginLoss(), layer="3", **kwargs)


def test_bad_boxes_are_refused():
    with pytest.raises(InputError, match="boxes"):
        crop_and_resize(torch.zeros(2, 3, 4, 4), torch.zeros(3, 4))


def test_an_image_in_several_tuples_is_cropped_around_the_mean_of_its_maps(one_thread,
                                                                           monkeypatch):
    from pytorch_metric_learning import losses

    from simexplain.engine.maps import scale_maps

    torch.manual_seed(3)
    model = small_net()
    images = torch.randn(5, 3, SIZE, SIZE)
    labels = torch.tensor([0, 0, 1, 1, 2])
    a, p, n = torch.tensor([0, 0]), torch.tensor([1, 1]), torch.tensor([2, 4])
    seen = crop_spy(monkeypatch)
    SAMLoss(model, losses.TripletMarginLoss(), gamma=1.0, layer="3", method="sam",
            augmentation="crop", max_mining_tuples=10, crop_threshold=0.7)(
        images, labels, (a, p, n))
    (boxes,) = seen
    maps = EmbeddingAttribution(model, "3", method="sam").attribute_tuples(
        (images[a], images[p], images[n])).maps  # (2 tuples, 3 slots, h, w)
    anchor = scale_maps(maps[:, 0]).mean(0, keepdim=True)  # image 0 anchors both tuples
    single = map_boxes(maps[:, 0], (SIZE, SIZE), 0.7)
    assert not any(torch.equal(box, map_boxes(anchor, (SIZE, SIZE), 0.7)[0]) for box in single)
    torch.testing.assert_close(boxes[:1], map_boxes(anchor, (SIZE, SIZE), 0.7))
    torch.testing.assert_close(boxes[2:3], map_boxes(maps[:1, 2], (SIZE, SIZE), 0.7))
