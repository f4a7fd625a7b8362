"""The similar-pairs benchmark's pieces, and its quick mode end to end on the pretrained
backbone; the counterfactual yardstick of the discriminative benchmark."""

import json

import torch
from pretrained_inputs import needs_pretrained

from _counterfactual import agreement, curve_areas, curve_images, pixel_orders
from simexplain.methods import DEFAULT_METHOD


def test_curves_remove_and_insert_pixels_in_the_maps_order():
    scenes = torch.ones(2, 3, 4, 4)
    backgrounds = torch.zeros(2, 3, 4, 4)
    maps = torch.arange(16.0).reshape(1, 4, 4).repeat(2, 1, 1)
    maps[1] = maps[1].flip(-1)
    order = pixel_orders(maps, 4)
    assert order[0, 0] == 15 and order[1, 0] == 12  # the highest value first
    deletion = curve_images(scenes, backgrounds, order, 5, insertion=False)
    insertion = curve_images(scenes, backgrounds, order, 5, insertion=True)
    kept = deletion[:, :, 0].sum(dim=(2, 3))  # pixels still showing the scene, per step
    assert kept[:, 0].tolist() == [16, 12, 8, 4, 0]
    torch.testing.assert_close(insertion, 1 - deletion)
    assert deletion[1, 0, 0, 3].sum() == 0 and deletion[1, 0, 0, :3].min() == 1  # top row first

    def brightness(layer):  # a criterion of the pooled "layer" (here the images themselves)
        return layer.mean(dim=(1, 2, 3))

    areas = curve_areas(lambda x: x, {"h": brightness}, scenes, backgrounds, maps, steps=5)
    torch.testing.assert_close(areas["h", "deletion"], torch.full((2,), 0.5))
    torch.testing.assert_close(areas["h", "insertion"], torch.full((2,), 0.5))


def test_agreement_counts_maps_that_favour_the_object_the_model_needs():
    match, distractor = torch.tensor([0.5, 0.1, 0.3]), torch.tensor([0.2, 0.4, 0.1])
    prefers = torch.tensor([True, False, False])
    assert agreement(match, distractor, prefers).tolist() == [1.0, 1.0, 0.0]


def test_near_duplicate_transforms_carry_maps_like_images():
    import similar_pairs

    x = torch.rand(2, 3, 16, 16)
    for name, (transform, carry) in similar_pairs.TRANSFORMS.items():
        moved = transform(x)
        assert moved.shape == x.shape and moved.min() >= 0 and moved.max() <= 1, name
        if carry is not similar_pairs.identity:  # geometric: maps move as images do
            torch.testing.assert_close(carry(x[:, :1]), moved[:, :1])


@needs_pretrained
def test_quick_run_meets_the_similar_pair_promises(tmp_path):
    import similar_pairs

    out = tmp_path / "similar_pairs.md"
    assert similar_pairs.main(["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    for method in similar_pairs.METHODS:
        assert f"| {method} |" in text
    results = json.loads(out.with_suffix(".json").read_text())["results"]
    default, sensitivity = results["pooled"][DEFAULT_METHOD], results["pooled"]["gradcam_cosine"]
    assert default["photos|mirror"]["median"] > 0.85 and default["photos|nonzero"]["mean"] == 1
    assert sensitivity["photos|mirror"]["median"] < 0  # the sensitivity reading inverts
