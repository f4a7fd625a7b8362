"""Paper SAM's criterion vectors ``w`` (METHOD.md section 1), by hand."""

import pytest
import torch
import torch.nn.functional as F

from simexplain.methods import criteria as W


def _unit(*shape):
    return F.normalize(torch.randn(*shape), dim=-1)


def test_pair_weights_by_hand():
    f1 = torch.tensor([[0.6, 0.8, 0.0]])
    f2 = torch.tensor([[0.0, 0.8, 0.6]])
    torch.testing.assert_close(W.same_class_pair_weights(f1, f2), torch.tensor([[0.4, 1.0, 0.4]]))
    torch.testing.assert_close(
        W.different_class_pair_weights(f1, f2), torch.tensor([[0.6, 0.0, 0.6]])
    )


def test_pair_weights_select_per_row():
    f1, f2 = _unit(3, 5), _unit(3, 5)
    same = torch.tensor([True, False, True])
    w = W.pair_weights(f1, f2, same)
    torch.testing.assert_close(w[same], W.same_class_pair_weights(f1, f2)[same])
    torch.testing.assert_close(w[~same], W.different_class_pair_weights(f1, f2)[~same])


def test_triplet_and_quadruplet_by_hand():
    fa = torch.tensor([[1.0, 0.0]])
    fp = torch.tensor([[0.8, 0.6]])
    fn = torch.tensor([[0.0, 1.0]])
    fn2 = torch.tensor([[-1.0, 0.0]])
    expected = torch.tensor([[0.8 * 1.0, 0.4 * 1.0]])
    torch.testing.assert_close(W.triplet_weights(fa, fp, fn), expected)
    torch.testing.assert_close(
        W.quadruplet_weights(fa, fp, fn, fn2), torch.tensor([[0.8 * 1.0 * 2.0, 0.4 * 1.0 * 0.0]])
    )


def test_weights_for_kind_and_scores():
    assert W.weights_for_kind("triplet") is W.triplet_weights
    with pytest.raises(ValueError, match="unknown tuple kind"):
        W.weights_for_kind("quintuplet")
    f = [_unit(2, 4) for _ in range(3)]
    w = W.triplet_weights(*f)
    scores = W.similarity_scores(w, f)
    assert scores.shape == (2, 3)
    torch.testing.assert_close(scores[:, 1], (w * f[1]).sum(-1))
