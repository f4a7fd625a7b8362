"""PairCorrespondence: exact for pooled linear heads, the estimate for any head."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from simexplain.errors import InputError
from simexplain.methods import PairCorrespondence, PointSpecific
from model_state import unchanged
from networks import resnet18, tiny_vit

RED, BLUE = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)


class GeM(nn.Module):
    """Generalised-mean pooling (p = 3), the retrieval head that is not a linear pool."""

    def forward(self, x):
        return x.clamp_min(1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)


def colour_net(head: nn.Module) -> nn.Sequential:
    """Channel 0 sees red, channel 1 blue (1x1 conv, no bias), the layer ``"1"``, then
    ``head``: the layer's cells hold (1, 0) on red, (0, 1) on blue and 0 elsewhere."""
    conv = nn.Conv2d(3, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, -1.0, -1.0], [-1.0, -1.0, 1.0]])[..., None, None])
    return nn.Sequential(conv, nn.ReLU(), head).eval()


def squares(red_at, blue_at, size=32, side=8):
    """A black image with a red and a blue square at (row, column) corners."""
    image = torch.zeros(3, size, size)
    for colour, (row, col) in ((RED, red_at), (BLUE, blue_at)):
        image[:, row:row + side, col:col + side] = torch.tensor(colour)[:, None, None]
    return image


def red_and_blue_pairs():
    first = squares((0, 0), (16, 16))
    second = squares((24, 8), (0, 20))  # moved, and the other way round
    return first[None], second[None]


def colour_of(points, image):
    pixels = image[:, points[:, 0], points[:, 1]]
    return ["red" if p[0] > 0.5 else "blue" if p[2] > 0.5 else "none" for p in pixels.T]


def matches(result, images1, images2, n):
    cells2 = result.matrix.shape[-1]
    values, order = result.matrix[0].flatten().topk(n)
    (h1, w1), (h2, w2) = result.grids
    size = images1.shape[-1]
    first = torch.stack([order // cells2 // w1, order // cells2 % w1], 1) * (size // h1)
    second = torch.stack([order % cells2 // w2, order % cells2 % w2], 1) * (size // h2)
    return first, second, values


@pytest.mark.parametrize("head", ["pooled", "gem"])
def test_red_matches_red_not_blue(head):
    pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()) if head == "pooled" else GeM()
    model = colour_net(pool)
    x1, x2 = red_and_blue_pairs()
    result = PairCorrespondence(model, layer="1").matrices(x1, x2)
    assert result.exact == (head == "pooled")
    first, second, values = matches(result, x1, x2, 8)
    assert bool((values > 0).all())
    colours = list(zip(colour_of(first, x1[0]), colour_of(second, x2[0])))
    assert all(a == b and a != "none" for a, b in colours), colours
    # no red cell of image 1 puts anything into a blue cell of image 2
    red = x1[0, 0].flatten() > 0.5  # the layer's grid is the image's (1x1 convolution)
    blue = x2[0, 2].flatten() > 0.5
    assert float(result.matrix[0][red][:, blue].abs().max()) == 0.0


def test_exact_path_conserves_the_score_and_is_point_to_point():
    model = resnet18()
    x1, x2 = torch.randn(2, 3, 3, 64, 64)
    result = PairCorrespondence(model, layer="layer4").matrices(x1, x2)
    assert result.exact and result.projections is None
    torch.testing.assert_close(result.matrix.sum(dim=(1, 2)), result.scores, atol=1e-5, rtol=0)
    intensity = PointSpecific(model, layer="layer4").point_to_point((x1, x2))
    torch.testing.assert_close(result.matrix, intensity.flatten(1, 2).flatten(2), atol=1e-7,
                               rtol=1e-5)
    embeddings = nn.functional.normalize(model(torch.cat([x1, x2])), dim=-1)
    torch.testing.assert_close(result.scores, (embeddings[:3] * embeddings[3:]).sum(-1))


def test_exact_path_with_a_reference_conserves_the_centred_score():
    model = resnet18()
    x1, x2 = torch.randn(2, 2, 3, 64, 64)
    reference = torch.randn(6, 16)
    result = PairCorrespondence(model, layer="layer4", reference=reference).matrices(x1, x2)
    centre = nn.functional.normalize(reference, dim=-1).mean(0)
    z = nn.functional.normalize(nn.functional.normalize(model(torch.cat([x1, x2])), dim=-1)
                                - centre, dim=-1)
    torch.testing.assert_close(result.scores, (z[:2] * z[2:]).sum(-1))
    torch.testing.assert_close(result.matrix.sum(dim=(1, 2)), result.scores, atol=1e-5, rtol=0)


def test_estimate_equals_the_exact_matrix_for_a_linear_pooled_head_without_bias():
    model = resnet18()
    model.fc = nn.Linear(512, 24, bias=False)
    x1, x2 = torch.randn(2, 2, 3, 64, 64)
    exact = PairCorrespondence(model, layer="layer4").matrices(x1, x2)
    estimate = PairCorrespondence(model, layer="layer4", head=None).matrices(x1, x2)
    assert exact.exact and not estimate.exact
    torch.testing.assert_close(estimate.matrix, exact.matrix, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(estimate.scores, exact.scores)


class Rotated(nn.Module):
    def __init__(self, model: nn.Module, rotation: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("rotation", rotation)

    def forward(self, x):
        return self.model(x) @ self.rotation.T


def _rotation(dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(dim, dim, generator=generator))[0]


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_matrices_do_not_move_when_the_embedding_is_rotated(seed):
    vit = tiny_vit(img_size=64)  # class-token head: the estimate, on the narrowed head
    gem = colour_net(GeM())
    torch.manual_seed(seed)
    coarse = _mlp_on_a_coarse_grid()  # forward-mode derivatives per cell
    for model, layer, images in ((vit, "blocks.1.norm1", torch.randn(2, 2, 3, 64, 64)),
                                 (gem, "1", torch.rand(2, 2, 3, 32, 32)),
                                 (coarse, "1", torch.rand(2, 2, 3, 32, 32))):
        dim = model(images[0]).shape[-1]
        rotated = Rotated(model, _rotation(dim, seed)).eval()
        layer_of_rotated = "model." + layer
        before = PairCorrespondence(model, layer=layer, projections=None).matrices(*images)
        after = PairCorrespondence(rotated, layer=layer_of_rotated,
                                   projections=None).matrices(*images)
        assert not before.exact
        scale = before.matrix.abs().amax()
        torch.testing.assert_close(after.matrix / scale, before.matrix / scale, atol=1e-5,
                                   rtol=0)


def test_random_projections_are_unbiased():
    model = colour_net(nn.Sequential(GeM(), nn.Linear(2, 12), nn.Tanh(), nn.Linear(12, 12)))
    torch.manual_seed(0)
    x1, x2 = torch.rand(2, 1, 3, 8, 8)
    full = PairCorrespondence(model, layer="1", projections=None).matrices(x1, x2).matrix
    draws = torch.stack([
        PairCorrespondence(model, layer="1", projections=3, seed=s).matrices(x1, x2).matrix
        for s in range(400)
    ])
    single = (draws - full).flatten(1).norm(dim=1).mean()
    assert float(single / full.norm()) > 0.05  # three of twelve directions are noisy ...
    # ... but their mean converges on the full matrix as 1 / sqrt(draws): 0.05 of a draw's
    # error for 400 draws; a bias would stay
    assert float((draws.mean(0) - full).norm() / single) < 0.1
    again = PairCorrespondence(model, layer="1", projections=3, seed=0).matrices(x1, x2)
    assert torch.equal(again.matrix, draws[0]) and again.projections == 3


def test_projections_at_least_d_use_every_coordinate():
    model = colour_net(nn.Sequential(GeM(), nn.Linear(2, 6)))
    x1, x2 = torch.rand(2, 1, 3, 32, 32)
    full = PairCorrespondence(model, layer="1", projections=None).matrices(x1, x2)
    many = PairCorrespondence(model, layer="1", projections=6).matrices(x1, x2)
    assert many.projections is None
    torch.testing.assert_close(many.matrix, full.matrix)


def test_a_batch_goes_through_together_as_pairs_one_by_one():
    model = tiny_vit(img_size=64)
    x1, x2 = torch.randn(2, 3, 3, 64, 64)
    method = PairCorrespondence(model, projections=16, chunk_size=2)
    batch = method.matrices(x1, x2)
    for b in range(3):
        one = method.matrices(x1[b:b + 1], x2[b:b + 1])
        torch.testing.assert_close(one.matrix[0], batch.matrix[b], atol=1e-6, rtol=1e-4)
    assert batch.grids == ((4, 4), (4, 4)) and batch.projections == 16


def test_sides_of_different_sizes():
    model = resnet18()
    result = PairCorrespondence(model, layer="layer4").matrices(torch.randn(1, 3, 64, 64),
                                                               torch.randn(1, 3, 96, 64))
    assert result.grids == ((2, 2), (3, 2)) and result.matrix.shape == (1, 4, 6)
    torch.testing.assert_close(result.matrix.sum(dim=(1, 2)), result.scores, atol=1e-5, rtol=0)


def _mlp_on_a_coarse_grid() -> nn.Sequential:
    """A 4 x 4 grid (16 cells) under a 40-d GeM + MLP head: fewer cells than coordinates."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 64, 3, stride=8), nn.ReLU(), GeM(), nn.Linear(64, 40),
                         nn.Tanh(), nn.Linear(40, 40)).eval()


def test_fewer_cells_than_coordinates_take_one_forward_derivative_per_cell(monkeypatch):
    from simexplain.methods import _location_shares

    model = _mlp_on_a_coarse_grid()
    x1, x2 = torch.rand(2, 3, 3, 32, 32)
    calls = []
    real = _location_shares.forward_shares
    monkeypatch.setattr(_location_shares, "forward_shares",
                        lambda *a: calls.append(a[2].shape[0]) or real(*a))
    forward = PairCorrespondence(model, layer="1", projections=None).matrices(x1, x2)
    projected = PairCorrespondence(model, layer="1", projections=20).matrices(x1, x2)
    assert calls == [16, 16] and forward.grids == ((4, 4), (4, 4))
    # 20 random directions would cost more passes than the 16 cells: every coordinate
    assert projected.projections is None
    torch.testing.assert_close(projected.matrix, forward.matrix)
    few = PairCorrespondence(model, layer="1", projections=8).matrices(x1, x2)
    assert few.projections == 8 and calls == [16, 16]  # 8 directions: backward passes
    monkeypatch.setattr(_location_shares.PendingShares, "_forward_shares", lambda *a: None)
    backward = PairCorrespondence(model, layer="1", projections=None).matrices(x1, x2)
    scale = backward.matrix.abs().amax()
    torch.testing.assert_close(forward.matrix / scale, backward.matrix / scale, atol=1e-6,
                               rtol=0)


def test_heads_without_forward_mode_fall_back_quietly(capfd):
    model = tiny_vit(img_size=64)  # CPU attention has no forward-mode derivative
    x1, x2 = torch.randn(2, 1, 3, 64, 64)
    method = PairCorrespondence(model, projections=None)
    result = method.matrices(x1, x2)
    assert result.projections is None and len(method.without_forward_mode) == 1
    assert capfd.readouterr().err == ""  # torch.fx's report of the failure is not shown


class Branching(nn.Module):
    """Untraceable by torch.fx (control flow on a value): the full-forward fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.net = colour_net(GeM())

    def forward(self, x):
        features = self.net[1](self.net[0](x))
        if bool(features.sum() >= 0):
            return self.net[2](features)
        return -self.net[2](features)


def test_models_that_cannot_be_split_give_the_same_matrices():
    model = Branching().eval()
    x1, x2 = red_and_blue_pairs()
    fallback = PairCorrespondence(model, layer="net.1").matrices(x1, x2)
    split = PairCorrespondence(model.net, layer="1").matrices(x1, x2)
    torch.testing.assert_close(fallback.matrix, split.matrix)


@pytest.mark.parametrize("train", [False, True])
def test_the_model_is_left_as_it_was(train):
    model = resnet18(eval=not train)
    model.fc = nn.Sequential(nn.Linear(512, 32), nn.ReLU(), nn.Linear(32, 16))
    model.layer4[0].conv1.weight.grad = torch.ones_like(model.layer4[0].conv1.weight)
    x1, x2 = torch.randn(2, 2, 3, 64, 64)
    with unchanged(model):
        result = PairCorrespondence(model, layer="layer4").matrices(x1, x2)
    assert not result.exact
    with unchanged(model), pytest.raises(InputError, match="batch of images"):
        PairCorrespondence(model).matrices(x1[0], x2)


@pytest.mark.parametrize("projections", [0, -3, 2.5, "all", True])
def test_bad_projections_are_refused(projections):
    with pytest.raises(InputError, match="projections"):
        PairCorrespondence(resnet18(), projections=projections)


def test_sides_must_pair_up():
    method = PairCorrespondence(resnet18())
    with pytest.raises(InputError, match="as many images"):
        method.matrices(torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32))
    with pytest.raises(InputError, match="float images"):
        method.matrices(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.randn(1, 3, 32, 32))
