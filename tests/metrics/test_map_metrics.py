"""Explanation-quality metrics: exact values on toy maps and toy models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from networks import Recorder
from simexplain import EmbeddingAttribution
from simexplain.errors import InputError, LayerError, ModelOutputError
from simexplain.metrics import (
    average_ranks,
    box_masks,
    compare_maps,
    deletion_auc,
    energy_in_box,
    insertion_auc,
    perturbation_curve,
    pointing_game,
    randomization_sanity,
    randomize_top_layers,
    spearman_correlation,
)
from model_state import unchanged

pytestmark = pytest.mark.usefixtures("one_thread")


def cos(u, v):
    """Cosine of two plain lists, 0 for a zero vector (as the metrics define it)."""
    norm = math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v))
    return sum(a * b for a, b in zip(u, v)) / norm if norm else 0.0


def image(values, height=2):
    """A (1, 1, H, W) image from a row-major list of pixel values."""
    return torch.tensor(values, dtype=torch.float32).view(1, 1, height, -1)


def tiny_net(embedding_dim=4):
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, embedding_dim),
    )


def trained_like(model):
    """Move every parameter and BN statistic away from its initial value."""
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.is_floating_point():
                tensor.add_(torch.rand_like(tensor) + 0.1)
    return model


# --------------------------------------------------------------------------- localisation


def test_box_masks_use_pixel_centres():
    mask = box_masks(torch.tensor([1.0, 0.0, 3.0, 2.0]), (3, 4))
    expected = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    # Fractional edges: a centre at 0.5 is inside [0.4, 1.5), at 1.5 it is not.
    assert box_masks(torch.tensor([0.4, 0.0, 1.5, 1.0]), (1, 3)).tolist() == [[True, False, False]]


def test_pointing_game_peak_inside_and_outside_box():
    maps = torch.zeros(3, 8, 8)
    maps[0, 1, 2] = 1.0  # inside the box
    maps[1, 6, 6] = 1.0  # outside
    maps[2, 4, 4] = 1.0  # just outside (x2 = 4 excludes column 4)
    boxes = torch.tensor([[0, 0, 4, 4]] * 3)
    assert pointing_game(maps, boxes).tolist() == [True, False, False]
    masks = box_masks(boxes, (8, 8))
    assert pointing_game(maps, masks).tolist() == [True, False, False]
    assert pointing_game(maps.unsqueeze(1), boxes).shape == (3,)


def test_pointing_game_tolerance_is_euclidean_pixels():
    maps = torch.zeros(1, 10, 10)
    maps[0, 5, 7] = 1.0  # 2 rows and 2 columns from the box's corner pixel (3, 5)
    box = torch.tensor([[0, 0, 6, 4]])
    distance = math.sqrt(8)
    assert not pointing_game(maps, box, tolerance=2.8)[0]
    assert pointing_game(maps, box, tolerance=distance)[0]


def test_pointing_game_first_maximum_wins_and_constant_maps_miss():
    maps = torch.zeros(3, 4, 4)
    maps[0, 0, 3] = maps[0, 3, 0] = 2.0  # tie: row-major first is (0, 3)
    maps[1] = 0.0
    maps[2] = -1.0
    truth = torch.zeros(3, 4, 4, dtype=torch.bool)
    truth[:, 0, 3] = True
    truth[1:] = True
    assert pointing_game(maps, truth).tolist() == [True, False, False]


def test_pointing_game_upsamples_layer_maps_and_uses_image_size_for_boxes():
    maps = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])  # top-right cell of a 2x2 grid
    assert pointing_game(maps, torch.tensor([[32, 0, 64, 32]]), image_size=(64, 64))[0]
    assert not pointing_game(maps, torch.tensor([[0, 32, 32, 64]]), image_size=(64, 64))[0]
    masks = torch.zeros(1, 64, 64, dtype=torch.bool)
    masks[0, :32, 32:] = True
    assert pointing_game(maps, masks)[0]


def test_pointing_game_per_slot_and_shared_ground_truth():
    maps = torch.zeros(2, 3, 4, 4)
    maps[:, 0, 0, 0] = 1.0
    maps[:, 1, 3, 3] = 1.0
    maps[:, 2, 0, 3] = 1.0
    per_slot = torch.tensor([[0, 0, 1, 1], [2, 2, 4, 4], [0, 0, 1, 1]]).expand(2, 3, 4)
    assert pointing_game(maps, per_slot).tolist() == [[True, True, False]] * 2
    shared = torch.tensor([[0, 0, 1, 1]] * 2)
    assert pointing_game(maps, shared).tolist() == [[True, False, False]] * 2
    # The tuple of (B, 1, h, w) maps that EmbeddingAttribution.attribute returns.
    as_tuple = tuple(maps[:, i : i + 1] for i in range(3))
    assert torch.equal(pointing_game(as_tuple, per_slot), pointing_game(maps, per_slot))


def test_energy_in_box_exact_fractions():
    uniform = torch.ones(1, 1, 8, 8)
    assert energy_in_box(uniform, torch.tensor([[0, 0, 4, 4]])).tolist() == [0.25]
    maps = torch.full((1, 8, 8), -5.0)
    maps[0, :2, :2] = 3.0  # negatives are clipped, so all positive mass is inside
    assert energy_in_box(maps, torch.tensor([[0, 0, 2, 2]])).tolist() == [1.0]
    half = torch.zeros(1, 4, 4)
    half[0, 0, 0] = half[0, 3, 3] = 1.0
    assert energy_in_box(half, torch.tensor([[0, 0, 2, 2]])).tolist() == [0.5]
    # A layer-resolution uniform map upsampled to the boxes' image size stays uniform.
    small = torch.ones(1, 1, 2, 2)
    value = energy_in_box(small, torch.tensor([[0, 0, 16, 16]]), image_size=(32, 32))
    assert value.tolist() == [0.25]


def test_energy_in_box_of_zero_map_is_zero_not_nan():
    maps = torch.zeros(2, 3, 4, 4)
    maps[1, 2] = 1.0
    result = energy_in_box(maps, torch.tensor([[0, 0, 2, 2]] * 2))
    assert result.shape == (2, 3)
    assert torch.equal(result, torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.25]]))


@pytest.mark.parametrize(
    "truth, message",
    [
        (torch.zeros(1, 4, 4, dtype=torch.bool), "empty"),
        (torch.tensor([[2, 2, 2, 3]]), "empty"),  # x1 == x2
        (torch.tensor([[5, 5, 9, 9]]), "empty"),  # outside a 4x4 image
        (torch.ones(1, 5, 5), "bool masks"),  # float mask
        (torch.ones(1, 4, 4), "read as boxes"),  # a float mask whose width is 4
        (torch.ones(2, 4, 4, dtype=torch.bool), "one mask or box per map"),
        (torch.ones(1, 2, 4, 4, dtype=torch.bool), "one mask or box per map"),
        (torch.tensor([[0.0, 0.0, float("nan"), 2.0]]), "NaN"),
        ([[0, 0, 2, 2]], "as tensors"),
    ],
)
def test_localisation_rejects_bad_ground_truth(truth, message):
    for metric in (pointing_game, energy_in_box):
        with pytest.raises(InputError, match=message):
            metric(torch.rand(1, 4, 4), truth)


@pytest.mark.parametrize(
    "maps, message",
    [
        (torch.rand(4, 4), "expected"),
        (torch.full((1, 4, 4), float("nan")), "NaN"),
        ([], "empty"),
        ([torch.rand(1, 1, 4, 4), torch.rand(1, 1, 3, 3)], "one"),
        ("map", "expected a tensor"),
    ],
)
def test_localisation_rejects_bad_maps(maps, message):
    with pytest.raises(InputError, match=message):
        pointing_game(maps, torch.tensor([[0, 0, 2, 2]]))


# --------------------------------------------------------------------------- deletion, insertion

X1 = [1.0, 2.0, 3.0, 4.0]
X2 = [1.0, 1.0, 1.0, 1.0]
# Slot 0 map ranks pixels 1, 2, 3, 0; slot 1's all-zero map deletes in raster order
# with ties="row-major".
PAIR_MAPS = torch.tensor([[[[0.1, 0.9], [0.5, 0.3]], [[0.0, 0.0], [0.0, 0.0]]]])


def deleted(values, order, count, fill=0.0):
    out = list(values)
    for pixel in order[:count]:
        out[pixel] = fill
    return out


def inserted(values, order, count, fill=0.0):
    out = [fill] * len(values)
    for pixel in order[:count]:
        out[pixel] = values[pixel]
    return out


def trapezoid(curve):
    step = 1 / (len(curve) - 1)
    return step * (sum(curve) - (curve[0] + curve[-1]) / 2)


ORDER_1, ORDER_2 = [1, 2, 3, 0], [0, 1, 2, 3]


def test_deletion_pair_each_matches_hand_computation():
    result = deletion_auc(
        nn.Flatten(), (image(X1), image(X2)), PAIR_MAPS, steps=4, baseline=0.0, ties="row-major"
    )
    slot0 = [cos(deleted(X1, ORDER_1, k), X2) for k in range(5)]
    slot1 = [cos(X1, deleted(X2, ORDER_2, k)) for k in range(5)]
    # Spelled out: [1, 2, 3, 4] -> [1, 0, 3, 4] -> [1, 0, 0, 4] -> [1, 0, 0, 0] -> 0.
    assert slot0 == pytest.approx(
        [10 / (2 * math.sqrt(30)), 8 / (2 * math.sqrt(26)), 5 / (2 * math.sqrt(17)), 0.5, 0.0]
    )
    assert result.curves.shape == (1, 2, 5)
    assert result.curves[0, 0].tolist() == pytest.approx(slot0, abs=1e-6)
    assert result.curves[0, 1].tolist() == pytest.approx(slot1, abs=1e-6)
    assert result.auc[0].tolist() == pytest.approx([trapezoid(slot0), trapezoid(slot1)], abs=1e-6)
    assert result.fractions.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert result.original.tolist() == pytest.approx([slot0[0]])
    assert (result.mode, result.perturb, result.slots) == ("deletion", "each", (0, 1))


def test_deletion_all_slots_together_matches_hand_computation():
    result = deletion_auc(
        nn.Flatten(),
        (image(X1), image(X2)),
        PAIR_MAPS,
        steps=4,
        baseline=0.0,
        perturb="all",
        ties="row-major",
    )
    both = [cos(deleted(X1, ORDER_1, k), deleted(X2, ORDER_2, k)) for k in range(5)]
    assert result.curves.shape == (1, 1, 5)
    assert result.curves[0, 0].tolist() == pytest.approx(both, abs=1e-6)
    assert result.auc[0].tolist() == pytest.approx([trapezoid(both)], abs=1e-6)


def test_insertion_starts_at_baseline_and_ends_at_original_similarity():
    result = insertion_auc(nn.Flatten(), (image(X1), image(X2)), PAIR_MAPS, steps=4, baseline=0.0)
    slot0 = [cos(inserted(X1, ORDER_1, k), X2) for k in range(5)]
    assert result.curves[0, 0].tolist() == pytest.approx(slot0, abs=1e-6)
    assert slot0[0] == 0.0 and slot0[1] == pytest.approx(0.5)
    assert torch.allclose(result.curves[..., -1], result.original[:, None])
    assert result.mode == "insertion"


def test_insertion_of_all_pixels_returns_original_similarity_on_a_cnn():
    model = tiny_net().eval()
    tuples = tuple(torch.rand(3, 1, 8, 8) for _ in range(3))
    maps = torch.rand(3, 3, 4, 4)
    result = insertion_auc(model, tuples, maps, steps=5, perturb="all")
    with torch.no_grad():
        fa, fp, fn = (nn.functional.normalize(model(x), dim=1) for x in tuples)
    margin = (fa * fp).sum(1) - (fa * fn).sum(1)
    assert torch.allclose(result.original, margin, atol=1e-6)
    assert torch.allclose(result.curves[:, 0, -1], margin, atol=1e-6)


def test_triplet_margin_matches_hand_computation():
    anchor, positive, negative = [1.0, 2.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 2.0, 2.0]
    maps = torch.zeros(1, 3, 2, 2)
    maps[0, 0] = torch.tensor([[0.0, 1.0], [0.0, 0.0]])  # anchor loses pixel 1 first
    tuples = (image(anchor), image(positive), image(negative))
    result = deletion_auc(nn.Flatten(), tuples, maps, steps=4, baseline=0.0, slots=[0])
    a1 = deleted(anchor, [1, 0, 2, 3], 1)
    expected = cos(a1, positive) - cos(a1, negative)
    assert result.curves.shape == (1, 1, 5)
    assert result.curves[0, 0, 1].item() == pytest.approx(expected, abs=1e-6)
    assert result.original.item() == pytest.approx(
        cos(anchor, positive) - cos(anchor, negative), abs=1e-6
    )


def test_deletion_order_follows_the_map_with_row_major_ties():
    model = Recorder()
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    maps = torch.zeros(1, 2, 2, 3)
    maps[0, 0] = torch.tensor([[1.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    expected_order = [4, 0, 2, 1, 3, 5]
    deletion_auc(
        model,
        (image(values), image(values)),
        maps,
        steps=6,
        baseline=-1.0,
        slots=[0],
        ties="row-major",
    )
    assert len(model.batches) == 3  # two originals, then every step of slot 0 in one forward
    steps = model.batches[2].flatten(1)
    assert steps.shape == (7, 6)
    for count, row in enumerate(steps.tolist()):
        assert row == deleted(values, expected_order, count, fill=-1.0)


def test_many_ties_are_broken_in_row_major_order():
    model = Recorder()
    values = torch.arange(1.0, 1025.0).view(1, 1, 32, 32)
    map_values = torch.randint(0, 3, (32, 32)).float()
    maps = torch.stack([map_values, map_values]).unsqueeze(0)
    deletion_auc(model, (values, values), maps, steps=4, baseline=-1.0, slots=[1], ties="row-major")
    flat_map = map_values.flatten().tolist()
    order = sorted(range(1024), key=lambda pixel: (-flat_map[pixel], pixel))
    for count, row in zip((0, 256, 512, 768, 1024), model.batches[2].flatten(1)):
        deleted_pixels = (row == -1).nonzero().flatten().tolist()
        assert deleted_pixels == sorted(order[:count])


def test_fractions_round_pixel_counts():
    model = Recorder()
    deletion_auc(
        model,
        (image(X1), image(X2)),
        PAIR_MAPS,
        steps=3,
        baseline=0.0,
        slots=[1],
        ties="row-major",
    )
    removed = (model.batches[2].flatten(1) == 0).sum(1).tolist()
    assert removed == [0, 1, 3, 4]  # round(0, 4/3, 8/3, 4)


def test_all_zero_maps_delete_in_raster_order():
    model = Recorder()
    deletion_auc(
        model,
        (image(X1), image(X2)),
        torch.zeros(1, 2, 2, 2),
        steps=4,
        baseline=0.0,
        slots=[0],
        ties="row-major",
    )
    rows = model.batches[2].flatten(1).tolist()
    assert rows == [deleted(X1, [0, 1, 2, 3], k) for k in range(5)]


def test_baselines_mean_blur_and_per_channel_tensor():
    flat = nn.Flatten()
    e0 = [1.0, 0.0, 0.0, 0.0]
    pair = (image(X1), image(e0))
    mean = deletion_auc(flat, pair, PAIR_MAPS, steps=4, baseline="mean", slots=[0])
    assert mean.curves[0, 0, -1].item() == pytest.approx(cos([2.5] * 4, e0))
    # A constant image blurs to itself, so the default (blur) deletion curve is flat.
    constant = (torch.full((2, 1, 6, 6), 0.7), torch.rand(2, 1, 6, 6))
    blur = deletion_auc(flat, constant, torch.rand(2, 2, 6, 6), steps=3)
    assert torch.allclose(blur.curves[:, 0], blur.original[:, None].expand(2, 4), atol=1e-6)
    two_channels = (torch.rand(1, 2, 2, 2), torch.rand(1, 2, 2, 2))
    fill = torch.tensor([5.0, -5.0]).view(2, 1, 1)
    result = deletion_auc(
        flat, two_channels, torch.rand(1, 2, 2, 2), steps=1, baseline=fill, slots=[0]
    )
    filled = [5.0] * 4 + [-5.0] * 4
    expected = cos(filled, two_channels[1].flatten().tolist())
    assert result.curves[0, 0, -1].item() == pytest.approx(expected, abs=1e-6)


def test_chunked_forwards_match_one_batch():
    model = tiny_net().eval()
    calls = []
    model.register_forward_pre_hook(lambda module, inputs: calls.append(inputs[0].shape[0]))
    tuples = (torch.rand(3, 1, 8, 8), torch.rand(3, 1, 8, 8))
    maps = torch.rand(3, 2, 4, 4)
    whole = deletion_auc(model, tuples, maps, steps=5, batch_size=1000)
    calls.clear()
    chunked = deletion_auc(model, tuples, maps, steps=5, batch_size=7)
    assert calls == [3, 3] + [7, 7, 4] * 2  # originals, then 6 steps x 3 tuples per slot
    assert torch.allclose(whole.curves, chunked.curves, atol=1e-6)
    assert torch.allclose(whole.auc, chunked.auc, atol=1e-6)


def test_perturbation_leaves_model_as_it_was_and_runs_without_grad():
    model = trained_like(tiny_net()).train()
    tuples = (torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8))
    modes = []
    model.register_forward_pre_hook(lambda module, inputs: modes.append(module.training))
    with unchanged(model):  # BN running stats included: the forwards ran in eval mode
        result = insertion_auc(model, tuples, torch.rand(2, 2, 8, 8), steps=2)
    assert model.training and modes and not any(modes)
    assert not result.curves.requires_grad and not result.auc.requires_grad


def test_custom_similarity_for_quadruplets():
    flat = nn.Flatten()
    quad = tuple(image(v) for v in (X1, X2, [0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]))
    maps = torch.zeros(1, 4, 2, 2)
    maps[0, 0] = PAIR_MAPS[0, 0]

    def anchor_positive(a, p, n1, n2):
        return (a * p).sum(-1)

    result = deletion_auc(
        flat, quad, maps, steps=4, baseline=0.0, similarity=anchor_positive, slots=[0]
    )
    expected = [cos(deleted(X1, ORDER_1, k), X2) for k in range(5)]
    assert result.curves[0, 0].tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"mode": "erase"}, "mode="),
        ({"perturb": "both"}, "perturb="),
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"slots": [2]}, "slots"),
        ({"slots": [0, 0]}, "slots"),
        ({"baseline": "zeros"}, "baseline"),
        ({"baseline": torch.zeros(3, 1, 1)}, "broadcast"),
        ({"blur_sigma": 0.0}, "blur_sigma"),
        ({"maps": torch.rand(2, 1, 4, 4)}, "one map per image"),
        ({"maps": torch.rand(1, 2, 4, 4)}, "one map per image"),
        ({"maps": torch.full((2, 2, 4, 4), float("inf"))}, "NaN or Inf"),
        ({"similarity": lambda a, b: a}, "one value per tuple"),
        ({"tuples": (torch.rand(2, 1, 8, 8),) * 4, "maps": torch.rand(2, 4, 4, 4)}, "similarity="),
        ({"tuples": torch.rand(2, 1, 8, 8)}, "tuple"),
    ],
)
def test_perturbation_rejects_bad_input_and_leaves_model(options, message):
    model = trained_like(tiny_net()).train()
    call = {
        "tuples": (torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)),
        "maps": torch.rand(2, 2, 4, 4),
        "steps": 2,
    }
    call.update(options)
    with unchanged(model), pytest.raises(InputError, match=message):
        perturbation_curve(model, call.pop("tuples"), call.pop("maps"), **call)


def test_perturbation_reports_bad_model_output():
    tuples = (torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4))
    with pytest.raises(ModelOutputError, match="one embedding vector per image"):
        deletion_auc(nn.Identity(), tuples, torch.rand(1, 2, 4, 4), steps=1)

    class NanAfterDeletion(nn.Module):
        def forward(self, x):
            return x.flatten(1).log()

    with pytest.raises(ModelOutputError, match="NaN or Inf"):
        deletion_auc(NanAfterDeletion(), tuples, torch.rand(1, 2, 4, 4), steps=1, baseline=0.0)


# --------------------------------------------------------------------------- rank statistics


def test_average_ranks_share_ties():
    values = torch.tensor([[3.0, 1.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert average_ranks(values).tolist() == [[4, 1, 4, 2, 4], [3, 3, 3, 3, 3]]


def test_spearman_hand_computations():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    # d = (0, 1, 1, 0): rho = 1 - 6 * 2 / (4 * 15).
    assert spearman_correlation(a, torch.tensor([[1.0, 3.0], [2.0, 4.0]])).item() == (
        pytest.approx(0.8)
    )
    # Ties: ranks (1.5, 1.5, 3, 4) against (4, 3, 2, 1): cov -4.5, variances 4.5 and 5.
    tied = torch.tensor([[1.0, 1.0], [2.0, 3.0]])
    falling = torch.tensor([[4.0, 3.0], [2.0, 1.0]])
    assert spearman_correlation(tied, falling).item() == pytest.approx(-4.5 / math.sqrt(22.5))
    assert spearman_correlation(a, a**3).item() == pytest.approx(1.0)
    assert spearman_correlation(a, -a).item() == pytest.approx(-1.0)
    assert spearman_correlation(a, torch.zeros(2, 2)).item() == 0.0  # constant: defined as 0


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    a = torch.randint(0, 5, (4, 3, 6, 6)).float()
    b = torch.randint(0, 5, (4, 3, 6, 6)).float() + 0.5 * a
    ours = spearman_correlation(a, b)
    assert ours.shape == (4, 3)
    for i in range(4):
        for j in range(3):
            theirs = stats.spearmanr(a[i, j].flatten().numpy(), b[i, j].flatten().numpy())[0]
            assert ours[i, j].item() == pytest.approx(theirs, abs=1e-6)


def test_compare_maps_hand_values():
    a = torch.tensor([[[4.0, 3.0], [2.0, 1.0]]])
    b = torch.tensor([[[4.0, 1.0], [3.0, 2.0]]])
    result = compare_maps(a, b, top_fraction=0.5)
    assert result.top_overlap.tolist() == pytest.approx([1 / 3])  # top {0, 1} vs {0, 2}
    # Scaled by the maximum: (1, .75, .5, .25) vs (1, .25, .75, .5).
    assert result.mean_abs_diff.tolist() == pytest.approx([0.25])
    assert result.spearman.tolist() == pytest.approx([0.4])  # d = (0, 2, 1, 1)
    same = compare_maps(a, a)
    assert (same.spearman.item(), same.pearson.item(), same.top_overlap.item()) == (1.0,) * 3
    assert same.mean_abs_diff.item() == 0.0


def test_compare_maps_rejects_mismatched_maps():
    with pytest.raises(InputError, match="same"):
        compare_maps(torch.rand(2, 3, 4, 4), torch.rand(2, 3, 5, 5))
    with pytest.raises(InputError, match="top_fraction"):
        compare_maps(torch.rand(1, 4, 4), torch.rand(1, 4, 4), top_fraction=0.0)


# --------------------------------------------------------------------------- randomisation


def test_randomize_top_layers_cascades_from_the_top():
    model = trained_like(tiny_net())
    with unchanged(model):
        one = randomize_top_layers(model, 1)
        two = randomize_top_layers(model, 2)
        named = randomize_top_layers(model, ["2"])
    # Resettable modules in order: 0 (conv), 2 (conv), 3 (BN), 6 (linear).
    changed = {
        "one": ["6"],
        "two": ["3", "6"],
        "named": ["2"],
    }
    for label, copy in (("one", one), ("two", two), ("named", named)):
        for index in ("0", "2", "3", "6"):
            module, original = copy.get_submodule(index), model.get_submodule(index)
            same = torch.equal(module.weight, original.weight)
            assert same == (index not in changed[label]), (label, index)
    assert torch.equal(two.get_submodule("3").running_mean, torch.zeros(3))  # BN stats reset


def test_randomize_top_layers_seed_and_global_rng():
    model = trained_like(tiny_net())
    state = torch.random.get_rng_state()
    first, second = randomize_top_layers(model, 2, seed=3), randomize_top_layers(model, 2, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # seeded: global RNG untouched
    assert torch.equal(first[6].weight, second[6].weight)
    other = randomize_top_layers(model, 2, seed=4)
    assert not torch.equal(first[6].weight, other[6].weight)


@pytest.mark.parametrize(
    "layers, error, message",
    [
        (0, InputError, "layers=0"),
        (5, InputError, "4 modules"),
        (True, InputError, "positive int"),
        ([], InputError, "positive int"),
        ("nope", LayerError, "no layer named"),
        ("1", LayerError, "no parameters"),
    ],
)
def test_randomize_top_layers_rejects_bad_layers(layers, error, message):
    model = tiny_net()
    with unchanged(model), pytest.raises(error, match=message):
        randomize_top_layers(model, layers)


def test_sanity_of_a_method_that_ignores_the_model_is_perfect_correlation():
    fixed = torch.rand(2, 3, 4, 4)
    seen = []

    def ignores_model(model, tuples):
        seen.append(model)
        return fixed

    model = trained_like(tiny_net())
    tuples = tuple(torch.rand(2, 1, 8, 8) for _ in range(3))
    with unchanged(model):
        result = randomization_sanity(model, tuples, ignores_model, layers=2)
    assert result.randomized_layers == ["6", "3"]
    assert seen[0] is model and seen[1] is not model
    assert not torch.equal(seen[1][6].weight, model[6].weight)
    assert torch.equal(result.spearman, torch.ones(2, 3))
    assert torch.equal(result.top_overlap, torch.ones(2, 3))
    assert torch.equal(result.maps, fixed) and torch.equal(result.randomized_maps, fixed)


def test_sanity_with_similarity_maps():
    model = trained_like(tiny_net()).eval()
    tuples = tuple(torch.rand(2, 1, 8, 8) for _ in range(3))

    def similarity_maps(model, tuples):
        return EmbeddingAttribution(model, layer="2").attribute(tuples)  # (B, 1, h, w) each

    with unchanged(model):
        result = randomization_sanity(model, tuples, similarity_maps, layers=["2", "3", "6"])
    assert result.maps.shape == result.randomized_maps.shape == (2, 3, 8, 8)
    for stat in (result.spearman, result.pearson, result.top_overlap, result.mean_abs_diff):
        assert stat.shape == (2, 3) and torch.isfinite(stat).all()
    assert not torch.equal(result.maps, result.randomized_maps)
    assert (result.spearman.abs() <= 1).all() and (result.top_overlap <= 1).all()


def test_sanity_rejects_a_non_callable():
    with pytest.raises(InputError, match="callable"):
        randomization_sanity(tiny_net(), (), "gradcam")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_metrics_on_cuda():
    model = tiny_net().cuda().eval()
    tuples = tuple(torch.rand(2, 1, 8, 8, device="cuda") for _ in range(2))
    maps = torch.rand(2, 2, 4, 4, device="cuda")
    result = deletion_auc(model, tuples, maps, steps=4)
    assert result.auc.device.type == "cuda"
    cpu = deletion_auc(model.cpu(), tuple(t.cpu() for t in tuples), maps.cpu(), steps=4)
    assert torch.allclose(result.auc.cpu(), cpu.auc, atol=1e-5)
    boxes = torch.tensor([[0, 0, 4, 4]] * 2, device="cuda")
    assert pointing_game(maps, boxes, tolerance=1.0).device.type == "cuda"
    assert spearman_correlation(maps, maps).device.type == "cuda"
    assert randomize_top_layers(tiny_net().cuda(), 2)[6].weight.device.type == "cuda"


def test_average_ranks_of_single_pixel_maps():
    """A 1 x 1 map (e.g. resnet18's layer4 at 32 px) has rank 1, and compares without error."""
    from simexplain.metrics import average_ranks, spearman_correlation

    assert average_ranks(torch.tensor([[5.0], [2.0]])).tolist() == [[1.0], [1.0]]
    assert spearman_correlation(torch.ones(2, 1, 1), torch.ones(2, 1, 1)).shape == (2,)
