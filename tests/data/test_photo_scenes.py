"""Scenes and views composed from photographs (here: synthetic "photos" of bright items)."""

import pytest
import torch

from simexplain.data import compose_scenes, compose_views


def photos(count: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(count, 1, 28, 28)
    for i in range(count):
        top, left = (int(v) for v in torch.randint(2, 8, (2,), generator=g))
        x[i, :, top : top + 16, left : left + 14] = 0.5 + 0.5 * torch.rand(1, generator=g)
    return x, torch.arange(count) % 4


def test_scenes_hold_distinct_non_overlapping_objects_with_exact_boxes():
    x, y = photos()
    scenes = compose_scenes(x, y, 8, image_size=96, seed=1)
    assert scenes.images.shape == (8, 3, 96, 96) and scenes.masks.shape == (8, 2, 96, 96)
    assert (scenes.labels[:, 0] != scenes.labels[:, 1]).all()
    assert (y[scenes.sources] == scenes.labels).all()
    assert not (scenes.masks[:, 0] & scenes.masks[:, 1]).any()
    for n in range(8):
        for k in range(2):
            x1, y1, x2, y2 = scenes.boxes[n, k].long().tolist()
            inside = torch.zeros(96, 96, dtype=torch.bool)
            inside[y1:y2, x1:x2] = True
            assert scenes.masks[n, k].any() and not (scenes.masks[n, k] & ~inside).any()
    assert scenes.images.min() >= 0 and scenes.images.max() <= 1
    assert torch.equal(scenes.colours[:, 0], scenes.colours[:, 1])  # one tint per scene


def test_scenes_are_deterministic_and_take_given_classes_and_clutter():
    x, y = photos()
    a = compose_scenes(x, y, 4, image_size=64, seed=3)
    b = compose_scenes(x, y, 4, image_size=64, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.boxes, b.boxes)
    classes = torch.tensor([[0, 1], [2, 3], [3, 0], [1, 2]])
    chosen = compose_scenes(x, y, 4, image_size=64, classes=classes, seed=3)
    assert torch.equal(chosen.labels, classes)
    clutter = [torch.rand(3, 40, 50), torch.rand(1, 30, 30)]
    busy = compose_scenes(x, y, 4, image_size=64, clutter=clutter, seed=3)
    plain = compose_scenes(x, y, 4, image_size=64, seed=3)
    def texture(scenes):  # neighbouring background pixels' difference
        step = (scenes.images[..., 1:] - scenes.images[..., :-1]).abs()
        background = ~scenes.masks.any(1, keepdim=True)[..., 1:].expand_as(step)
        return step[background].mean()

    assert texture(busy) > 2 * texture(plain)


def test_views_show_another_photo_of_the_class():
    x, y = photos()
    scenes = compose_scenes(x, y, 6, image_size=64, seed=4)
    views = compose_views(x, y, scenes.labels[:, 0], exclude=scenes.sources[:, 0],
                          image_size=64, seed=5)
    assert views.images.shape == (6, 3, 64, 64) and views.labels.shape == (6, 1)
    assert torch.equal(views.labels[:, 0], scenes.labels[:, 0])
    assert (views.sources[:, 0] != scenes.sources[:, 0]).all()
    assert views.masks.any((2, 3)).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"objects_per_scene": 5}, "objects_per_scene"),
    ({"object_size": (0.3, 0.6)}, "object_size"),
    ({"image_size": 16}, "image_size"),
])
def test_bad_options_are_clear(kwargs, message):
    x, y = photos()
    with pytest.raises(ValueError, match=message):
        compose_scenes(x, y, 2, **kwargs)
