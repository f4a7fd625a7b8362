"""Which way the mining term pushes: erase, drop and the paper's terms (issue 24)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from model_state import assert_unchanged, snapshot
from networks import small_net
from simexplain import InputError
from simexplain.training import SAMLoss, SimilarityMiningLoss, criterion_slack, mining_term

SIZE = 12
ROOT2 = math.sqrt(2.0)
NEAR = math.sqrt(0.8)  # |(1, 0) - (0.6, 0.8)|

# Unit embeddings with hand-computable distances: |a-p| = sqrt 2, |a-n| = 2, |a-n2| = sqrt .8
A, P, N, N2 = (torch.tensor([v]) for v in ([1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]))


@pytest.mark.parametrize(
    "kind, slots, direction, margin, expected",
    [
        # triplet slack g = |a-n| - |a-p| - m = 2 - sqrt2 - m
        ("triplet", (A, P, N), "paper", None, ROOT2 - 2),
        ("triplet", (A, P, N), "drop", None, ROOT2 - 2),
        ("triplet", (A, P, N), "erase", None, 2 - ROOT2),
        ("triplet", (A, P, N), "drop", 0.2, 0.0),  # met with margin 0.2: no push
        ("triplet", (A, P, N), "drop", 0.7, ROOT2 - 2 + 0.7),
        ("triplet", (A, P, N), "erase", 0.2, 2 - ROOT2 - 0.2),
        ("triplet", (A, P, N), "erase", 0.7, 0.0),  # already fails with margin 0.7
        # quadruplet: one slack per negative, 2 - sqrt2 and sqrt.8 - sqrt2
        ("quadruplet", (A, P, N, N2), "paper", None, 2 * ROOT2 - 2 - NEAR),
        ("quadruplet", (A, P, N, N2), "erase", None, 2 + NEAR - 2 * ROOT2),
        ("quadruplet", (A, P, N, N2), "erase", 0.0, 2 - ROOT2),
        ("quadruplet", (A, P, N, N2), "drop", 0.0, ROOT2 - NEAR),
        # same-class pair slack g = m - |f1 - f2| = m - sqrt.8
        ("same_pair", (A, N2), "paper", None, -NEAR),
        ("same_pair", (A, N2), "erase", None, -NEAR),
        ("same_pair", (A, N2), "drop", None, NEAR),
        ("same_pair", (A, N2), "erase", 0.5, 0.0),  # already apart by more than 0.5
        ("same_pair", (A, N2), "erase", 1.0, 1.0 - NEAR),
        ("same_pair", (A, N2), "drop", 0.5, NEAR - 0.5),
    ],
)
def test_mining_term_exact(kind, slots, direction, margin, expected):
    value = mining_term(kind, *slots, direction=direction, margin=margin)
    torch.testing.assert_close(value, torch.tensor([expected]))
    loss = SimilarityMiningLoss(kind, direction, margin)
    torch.testing.assert_close(loss(*(3 * s for s in slots)), torch.tensor(expected))


def test_paper_terms_are_the_paper_equations():
    """``"paper"``: the pair is erased, the triplet and quadruplet dropped."""
    from simexplain.training import (quadruplet_mining_term, same_pair_mining_term,
                                     triplet_mining_term)

    torch.manual_seed(0)
    f = [torch.nn.functional.normalize(torch.randn(5, 4), dim=1) for _ in range(4)]
    torch.testing.assert_close(mining_term("same_pair", *f[:2]), same_pair_mining_term(*f[:2]))
    torch.testing.assert_close(mining_term("triplet", *f[:3]), triplet_mining_term(*f[:3]))
    torch.testing.assert_close(mining_term("quadruplet", *f), quadruplet_mining_term(*f))


unit_rows = st.lists(st.floats(-1, 1, allow_nan=False), min_size=3, max_size=3).filter(
    lambda v: sum(x * x for x in v) > 1e-2)


@settings(max_examples=40, deadline=None)
@given(st.lists(unit_rows, min_size=4, max_size=4),
       st.floats(0, 2, allow_nan=False), st.sampled_from(["same_pair", "triplet", "quadruplet"]))
def test_erase_and_drop_are_opposite(rows, margin, kind):
    """Linear terms negate each other; hinges are the two halves of the slack."""
    slots = [torch.nn.functional.normalize(torch.tensor([r]), dim=1)
             for r in rows[:{"same_pair": 2, "triplet": 3, "quadruplet": 4}[kind]]]
    erase = mining_term(kind, *slots, direction="erase")
    torch.testing.assert_close(mining_term(kind, *slots, direction="drop"), -erase)
    hinged = [mining_term(kind, *slots, direction=d, margin=margin) for d in ("erase", "drop")]
    slack = criterion_slack(kind, *slots, margin=margin)
    torch.testing.assert_close(hinged[0] - hinged[1], slack.sum(1))
    assert (hinged[0] >= 0).all() and (hinged[1] >= 0).all()


def masked_slots_spy(monkeypatch) -> list:
    """Record the per-slot embeddings the mining term is computed on."""
    from simexplain.training import loss as loss_module

    seen = []
    real = loss_module.slot_embeddings

    def spy(*args):
        out = real(*args)
        seen.append([e.detach() for e in out])
        return out

    monkeypatch.setattr(loss_module, "slot_embeddings", spy)
    return seen


@pytest.mark.parametrize("count, kind", [(2, "same_pair"), (3, "triplet"), (4, "quadruplet")])
@pytest.mark.parametrize("direction, margin", [("erase", None), ("drop", None), ("erase", 0.1),
                                               ("drop", 0.3), ("paper", None)])
def test_sam_loss_uses_the_chosen_term(one_thread, monkeypatch, count, kind, direction, margin):
    torch.manual_seed(1)
    model = small_net()
    slots = tuple(torch.randn(4, 3, SIZE, SIZE) for _ in range(count))
    kwargs = {"same_class": True} if count == 2 else {}
    metric = (lambda f1, f2, same: f1.sum() * 0) if count == 2 else (lambda *f: f[0].sum() * 0)
    seen = masked_slots_spy(monkeypatch)
    criterion = SAMLoss(model, metric, gamma=1.0, layer="3", direction=direction,
                        mining_margin=margin)
    criterion(slots, **kwargs)
    normalized = [torch.nn.functional.normalize(e, dim=1) for e in seen[0]]
    expected = mining_term(kind, *normalized, direction=direction, margin=margin).mean()
    torch.testing.assert_close(criterion.last.mining, expected)


def test_erase_is_the_negated_drop_in_sam_loss(one_thread):
    model = small_net()
    slots = tuple(torch.randn(4, 3, SIZE, SIZE) for _ in range(3))
    totals = {}
    for direction in ("erase", "drop", "paper"):
        criterion = SAMLoss(model, nn.TripletMarginLoss(), gamma=0.5, layer="3",
                            direction=direction)
        criterion(slots)
        totals[direction] = criterion.last.mining
    torch.testing.assert_close(totals["erase"], -totals["drop"])
    torch.testing.assert_close(totals["paper"], totals["drop"])


@pytest.mark.parametrize("direction", ["erase", "drop"])
def test_a_step_leaves_the_model_state_as_training_would(one_thread, direction):
    """Running statistics see the unmasked batch only; no hooks, modes or grads change."""
    model = small_net(batch_norm=True).train()
    reference = small_net(batch_norm=True).train()
    reference.load_state_dict(model.state_dict())
    slots = tuple(torch.randn(4, 3, SIZE, SIZE) for _ in range(3))
    before = snapshot(model)
    SAMLoss(model, nn.TripletMarginLoss(), layer="3", direction=direction,
            mining_margin=0.2)(slots)
    with torch.no_grad():
        reference(torch.cat(slots))
    for name, buffer in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], buffer, msg=name)
    before["buffers"] = snapshot(model)["buffers"]  # as the unmasked forward left them
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"direction": "pull"}, "direction"), ({"mining_margin": -0.1}, "mining_margin"),
     ({"mining_margin": float("inf")}, "mining_margin"),
     ({"mining_margin": True}, "mining_margin")],
)
def test_bad_direction_or_margin(kwargs, message):
    with pytest.raises(InputError, match=message):
        SAMLoss(small_net(), nn.TripletMarginLoss(), layer="3", **kwargs)
    with pytest.raises(InputError, match="direction"):
        SimilarityMiningLoss("triplet", direction="up")
