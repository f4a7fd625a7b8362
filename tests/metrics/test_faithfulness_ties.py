"""Deletion/insertion with tied map values: random tie orders, averaged over draws.

A ReLU'd map leaves large regions at exactly zero. Ranked in raster order, those pixels
are removed top row first, so the AUC would depend on where the evidence sits in the
image; ranked at random (the default), it does not, and matches in expectation the AUC
of an uninformed order.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from networks import Recorder
from simexplain.errors import InputError
from simexplain.metrics import deletion_auc, insertion_auc, perturbation_curve

pytestmark = pytest.mark.usefixtures("one_thread")


def cos(u, v):
    norm = math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v))
    return sum(a * b for a, b in zip(u, v)) / norm if norm else 0.0


def deleted(values, order, count, fill=0.0):
    out = list(values)
    for pixel in order[:count]:
        out[pixel] = fill
    return out


def trapezoid(curve):
    step = 1 / (len(curve) - 1)
    return step * (sum(curve) - (curve[0] + curve[-1]) / 2)


class EvidenceShare(nn.Module):
    """A unit embedding ``(s, sqrt(1 - s^2))`` whose first entry ``s`` is the share of the
    reference image's mass left in the input: linear in the pixels, so its expected value
    over random deletion orders is exact."""

    def __init__(self, reference):
        super().__init__()
        self.register_buffer("total", reference.sum())

    def forward(self, x):
        share = (x.flatten(1).sum(1) / self.total).clamp(0, 1)
        return torch.stack([share, (1 - share.square()).clamp_min(0).sqrt()], dim=1)


def share_of_slot0(a, b):
    return a[:, 0]


def block_image(corner, size=16, block=8):
    """A (1, 1, size, size) image of zeros with a block of ones at a corner."""
    out = torch.zeros(1, 1, size, size)
    if corner == "top-left":
        out[..., :block, :block] = 1.0
    else:
        out[..., -block:, -block:] = 1.0
    return out


def evidence_deletion(corner, **options):
    x = block_image(corner)
    return deletion_auc(
        EvidenceShare(x),
        (x, x),
        torch.zeros(1, 2, 16, 16),  # an all-zero map: every pixel tied
        steps=4,
        baseline=0.0,
        slots=[0],
        similarity=share_of_slot0,
        **options,
    )


# --------------------------------------------------------------------------- tied maps


def test_all_zero_map_auc_does_not_depend_on_where_the_evidence_sits():
    # Raster order removes the top-left block in the first half and the bottom-right one
    # last: AUC 0.25 against 0.75. A random order removes a quarter of each per step in
    # expectation: curve (1, 0.75, 0.5, 0.25, 0), AUC 0.5 exactly.
    top, bottom = evidence_deletion("top-left"), evidence_deletion("bottom-right")
    assert top.auc.item() == pytest.approx(0.5, abs=0.04)
    assert bottom.auc.item() == pytest.approx(0.5, abs=0.04)
    assert abs(top.auc.item() - bottom.auc.item()) < 0.08
    raster_top = evidence_deletion("top-left", ties="row-major")
    raster_bottom = evidence_deletion("bottom-right", ties="row-major")
    assert raster_top.curves[0, 0].tolist() == pytest.approx([1, 0.5, 0, 0, 0], abs=1e-6)
    assert raster_bottom.curves[0, 0].tolist() == pytest.approx([1, 1, 1, 0.5, 0], abs=1e-6)


def test_many_draws_approach_the_exact_expected_curve():
    result = evidence_deletion("top-left", tie_draws=400, seed=3)
    assert result.curves[0, 0].tolist() == pytest.approx([1, 0.75, 0.5, 0.25, 0], abs=0.01)
    assert result.auc.item() == pytest.approx(0.5, abs=0.005)


def test_insertion_of_an_all_zero_map_is_uninformed_too():
    x = block_image("top-left")
    result = insertion_auc(
        EvidenceShare(x),
        (x, x),
        torch.zeros(1, 2, 16, 16),
        steps=4,
        baseline=0.0,
        slots=[0],
        similarity=share_of_slot0,
        tie_draws=400,
    )
    assert result.curves[0, 0].tolist() == pytest.approx([0, 0.25, 0.5, 0.75, 1], abs=0.01)


def test_curve_is_the_mean_over_the_draws_of_the_perturbed_images():
    model = Recorder()
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    x1 = torch.tensor(values).view(1, 1, 2, 3)
    x2 = torch.tensor([1.0, -1.0, 2.0, 0.5, 1.0, 3.0]).view(1, 1, 2, 3)
    maps = torch.zeros(1, 2, 2, 3)
    maps[0, 0] = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 0.0]])  # pixel 1, then 5 tied
    result = deletion_auc(model, (x1, x2), maps, steps=3, baseline=-1.0, slots=[0], tie_draws=4)
    images = torch.cat(model.batches[2:]).flatten(1)
    by_count = {}
    for row in images.tolist():
        by_count.setdefault(sum(v == -1.0 for v in row), []).append(row)
    # Counts 0, 2, 4, 6: 2 and 4 split the tied five, so they are embedded in 4 draws.
    assert {c: len(rows) for c, rows in by_count.items()} == {0: 1, 2: 4, 4: 4, 6: 1}
    for count in (2, 4):  # the one ranked pixel goes first, then tied ones at random
        assert all(row[1] == -1.0 for row in by_count[count])
    expected = [
        sum(cos(row, x2.flatten().tolist()) for row in by_count[c]) / len(by_count[c])
        for c in (0, 2, 4, 6)
    ]
    assert result.curves[0, 0].tolist() == pytest.approx(expected, abs=1e-6)
    assert result.auc.item() == pytest.approx(trapezoid(expected), abs=1e-6)
    assert len({tuple(row) for row in by_count[2]}) > 1  # the draws differ


def test_same_seed_same_result_other_seed_differs_for_tied_maps():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
    ).eval()
    tuples = (torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8))
    maps = torch.relu(torch.randn(2, 2, 8, 8))  # about half of each map at zero
    first = deletion_auc(model, tuples, maps, steps=5, seed=7)
    again = deletion_auc(model, tuples, maps, steps=5, seed=7)
    other = deletion_auc(model, tuples, maps, steps=5, seed=8)
    assert torch.equal(first.curves, again.curves) and torch.equal(first.auc, again.auc)
    assert not torch.equal(first.curves, other.curves)
    # The steps before the zero region is reached do not depend on the draw.
    assert torch.equal(first.curves[..., :2], other.curves[..., :2])


def test_perturb_all_pairs_the_draws_of_the_slots():
    # The similarity reads slot 0 only, so perturbing both slots together gives slot 0's
    # own curve, draw for draw (the same generator draws the same orders).
    x = block_image("top-left")
    options = dict(steps=4, baseline=0.0, similarity=share_of_slot0, tie_draws=5)
    maps = torch.zeros(1, 2, 16, 16)
    maps[0, 1] = torch.arange(256.0).view(16, 16)  # slot 1 without ties
    each = deletion_auc(EvidenceShare(x), (x, x), maps, perturb="each", **options)
    together = deletion_auc(EvidenceShare(x), (x, x), maps, perturb="all", **options)
    assert torch.equal(together.curves[:, 0], each.curves[:, 0])


# --------------------------------------------------------------------------- maps without ties


X1 = [1.0, 2.0, 3.0, 4.0]
X2 = [1.0, 1.0, 1.0, 1.0]
DISTINCT = torch.tensor([[[[0.1, 0.9], [0.5, 0.3]], [[0.4, 0.2], [0.8, 0.6]]]])


def test_maps_without_ties_give_the_row_major_result_in_one_draw():
    model = Recorder()
    x1, x2 = torch.tensor(X1).view(1, 1, 2, 2), torch.tensor(X2).view(1, 1, 2, 2)
    result = deletion_auc(model, (x1, x2), DISTINCT, steps=4, baseline=0.0, tie_draws=5)
    assert len(model.batches) == 4  # two originals, then one forward of 5 steps per slot
    order1, order2 = [1, 2, 3, 0], [2, 3, 0, 1]
    slot0 = [cos(deleted(X1, order1, k), X2) for k in range(5)]
    slot1 = [cos(X1, deleted(X2, order2, k)) for k in range(5)]
    assert slot0 == pytest.approx(
        [10 / (2 * math.sqrt(30)), 8 / (2 * math.sqrt(26)), 5 / (2 * math.sqrt(17)), 0.5, 0.0]
    )
    assert result.curves[0, 0].tolist() == pytest.approx(slot0, abs=1e-6)
    assert result.curves[0, 1].tolist() == pytest.approx(slot1, abs=1e-6)
    raster = deletion_auc(nn.Flatten(), (x1, x2), DISTINCT, steps=4, baseline=0.0, ties="row-major")
    assert torch.equal(result.curves, raster.curves) and torch.equal(result.auc, raster.auc)


def test_ties_that_no_step_splits_cost_no_extra_forward():
    model = Recorder()
    x = torch.arange(1.0, 5.0).view(1, 1, 2, 2)
    maps = torch.tensor([[[[2.0, 2.0], [1.0, 1.0]]] * 2])  # steps at 0, 2, 4 pixels
    deletion_auc(model, (x, x), maps, steps=2, baseline=0.0, slots=[0], tie_draws=5)
    assert [b.shape[0] for b in model.batches] == [1, 1, 3]


def test_no_tie_results_do_not_depend_on_seed_or_draws_on_a_cnn():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
    ).eval()
    tuples = tuple(torch.rand(3, 1, 8, 8) for _ in range(3))
    maps = torch.randn(3, 3, 8, 8)  # signed, at image size: no ties
    raster = insertion_auc(model, tuples, maps, steps=4, ties="row-major")
    for options in ({}, {"seed": 5, "tie_draws": 7}, {"tie_draws": 1}):
        result = insertion_auc(model, tuples, maps, steps=4, **options)
        assert torch.equal(result.curves, raster.curves)


# --------------------------------------------------------------------------- properties


@settings(max_examples=25, deadline=None)
@given(
    levels=st.lists(st.integers(0, 2), min_size=12, max_size=12),
    steps=st.integers(1, 6),
    draws=st.integers(1, 4),
    seed=st.integers(0, 2**31),
)
def test_every_draw_perturbs_a_top_set_of_the_map(levels, steps, draws, seed):
    model = Recorder()
    x = torch.arange(1.0, 13.0).view(1, 1, 3, 4)
    map_values = torch.tensor(levels, dtype=torch.float32).view(3, 4)
    maps = torch.stack([map_values, map_values]).unsqueeze(0)
    result = deletion_auc(
        model, (x, x), maps, steps=steps, baseline=-1.0, slots=[1], tie_draws=draws, seed=seed
    )
    counts = {round(s / steps * 12) for s in range(steps + 1)}
    rows = torch.cat(model.batches[2:]).flatten(1)
    split = 0
    for count in counts:
        at_count = [row for row in rows if int((row == -1).sum()) == count]
        ordered = sorted(levels, reverse=True)
        is_split = 0 < count < 12 and ordered[count - 1] == ordered[count]
        assert len(at_count) == (draws if is_split else 1)
        split += is_split
        for row in at_count:
            gone = (row == -1).tolist()
            kept_levels = [v for v, g in zip(levels, gone) if not g]
            gone_levels = [v for v, g in zip(levels, gone) if g]
            assert not gone_levels or not kept_levels or min(gone_levels) >= max(kept_levels)
    assert rows.shape[0] == len(counts) + (draws - 1) * split
    assert torch.isfinite(result.auc).all()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"ties": "first"}, "ties="),
        ({"tie_draws": 0}, "tie_draws"),
        ({"tie_draws": 2.0}, "tie_draws"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
    ],
)
def test_tie_options_are_checked(options, message):
    tuples = (torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4))
    with pytest.raises(InputError, match=message):
        perturbation_curve(nn.Flatten(), tuples, torch.zeros(1, 2, 4, 4), steps=2, **options)
