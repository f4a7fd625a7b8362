"""The layout of the images a module gets: channels-last for convolutional networks on a
CPU in float32, NCHW for the rest, for modules that fail on it and for training."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from model_state import assert_unchanged, snapshot
from networks import conv_net, small_net
from pytorch_metric_learning import losses

from simexplain import EmbeddingAttribution, ModelForwardError, explain
from simexplain.training import SAMLoss
from simexplain.methods import RISE, SBSM
from simexplain.engine import input_layout as layout
from simexplain.engine import SimilarityEngine
from simexplain.engine.input_layout import prefers_channels_last
from simexplain.engine.stored import head_split, run_trunk

pytestmark = pytest.mark.usefixtures("one_thread")


class LayoutRecorder(nn.Module):
    """A convolutional embedder that remembers whether each batch came channels-last."""

    def __init__(self, views_input: bool = False) -> None:
        super().__init__()
        self.trunk = small_net()
        self.views_input = views_input
        self.channels_last: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        self.channels_last.append(
            x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous())
        if self.views_input:  # as some hand-written models do; NCHW only
            n, c, h, w = x.shape
            x = x.view(n, -1).view(n, c, h, w)
        return self.trunk(x)


def pair(size: int = 12, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, size, size, generator=generator).to(dtype)
    return x[:1], x[1:]


def test_which_models_get_channels_last():
    images = torch.zeros(2, 3, 8, 8)
    assert prefers_channels_last(conv_net(), images)
    mostly_linear = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 64))
    assert not prefers_channels_last(mostly_linear, images)
    assert not prefers_channels_last(conv_net(), images.double())
    assert not prefers_channels_last(conv_net(), images[0])
    assert not prefers_channels_last(lambda x: x.flatten(1), images)
    if torch.cuda.is_available():
        assert not prefers_channels_last(conv_net().cuda(), images.cuda())


@pytest.mark.parametrize("method", [SBSM, RISE])
def test_a_convolutional_module_gets_channels_last_and_the_same_maps(method, monkeypatch):
    model = LayoutRecorder()
    options = {"window": 4} if method is SBSM else {"n_masks": 24, "seed": 0}
    maps = method(model, **options).explain(pair(), relu=False)
    assert model.channels_last and all(model.channels_last)
    monkeypatch.setattr(layout, "prefers_channels_last", lambda model, images: False)
    nchw_model = LayoutRecorder()
    nchw_model.load_state_dict(model.state_dict())
    nchw = method(nchw_model, **options).explain(pair(), relu=False)
    assert not any(nchw_model.channels_last)
    torch.testing.assert_close(maps, nchw, rtol=1e-5, atol=1e-6)


def test_a_module_that_views_its_input_falls_back_to_nchw():
    model = LayoutRecorder(views_input=True)
    before = snapshot(model)
    first = SBSM(model, window=4).explain(pair(), relu=False)
    # its first batch failed channels-last and was run again in NCHW, as every later one
    assert model.channels_last[0] and not any(model.channels_last[1:])
    assert not prefers_channels_last(model, torch.zeros(1, 3, 8, 8))
    assert_unchanged(model, before)
    plain = LayoutRecorder()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(first, SBSM(plain, window=4).explain(pair(), relu=False),
                               rtol=1e-5, atol=1e-6)


def test_a_model_that_fails_in_both_layouts_raises_its_error_and_keeps_its_verdict():
    model = LayoutRecorder()
    with pytest.raises(ModelForwardError, match="5 channels"):
        explain(model, [torch.rand(5, 12, 12), torch.rand(5, 12, 12)], [0, 0],
                method="sbsm", window=4)
    assert model.channels_last == [True, False]  # tried both, once
    assert prefers_channels_last(model, torch.zeros(1, 3, 8, 8))


def gradient_maps(model: nn.Module) -> Tensor:
    return torch.cat(EmbeddingAttribution(model, "trunk.3").attribute(pair(16)))


def test_the_gradient_engine_gives_a_convolutional_module_channels_last_and_the_same_maps(
        monkeypatch):
    model = LayoutRecorder()
    before = snapshot(model)
    maps = gradient_maps(model)
    assert model.channels_last[-1]  # the explained pass (the layer search runs NCHW)
    assert_unchanged(model, before)
    monkeypatch.setattr(layout, "prefers_channels_last", lambda model, images: False)
    nchw_model = LayoutRecorder()
    nchw_model.load_state_dict(model.state_dict())
    nchw = gradient_maps(nchw_model)
    assert not any(nchw_model.channels_last)
    assert maps.abs().amax() > 0
    torch.testing.assert_close(maps, nchw, rtol=1e-5, atol=1e-6)


def test_the_gradient_engine_falls_back_to_nchw_for_a_module_that_views_its_input():
    model = LayoutRecorder(views_input=True)
    before = snapshot(model)
    maps = gradient_maps(model)
    tried = model.channels_last.index(True)
    # the channels-last pass failed and ran again in NCHW, as every later one
    assert not any(model.channels_last[tried + 1:])
    assert not prefers_channels_last(model, torch.zeros(1, 3, 8, 8))
    assert_unchanged(model, before)
    plain = LayoutRecorder()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(maps, gradient_maps(plain), rtol=1e-5, atol=1e-6)


def test_training_passes_keep_the_images_as_given():
    model = LayoutRecorder()
    criterion = SAMLoss(model, losses.TripletMarginLoss(), gamma=0.5, layer="trunk.3")
    x = torch.rand(3, 4, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    criterion(tuple(x)).backward()
    assert model.channels_last and not any(model.channels_last)


def test_nchw_only_gives_every_model_its_images_as_given():
    model = LayoutRecorder()
    with layout.nchw_only():
        assert not prefers_channels_last(model, torch.zeros(1, 3, 8, 8))
        inside = gradient_maps(model)
        SBSM(model, window=4).explain(pair(), relu=False)
    assert not any(model.channels_last)
    assert prefers_channels_last(model, torch.zeros(1, 3, 8, 8))  # the verdict is kept
    torch.testing.assert_close(inside, gradient_maps(model), rtol=1e-5, atol=1e-6)


def test_the_stored_activation_trunk_runs_channels_last_and_agrees_with_nchw():
    model = conv_net()
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    _, split = head_split(SimilarityEngine(model, "act"), images)
    embeddings, crossing = run_trunk(split, model, images)
    assert crossing[0].is_contiguous(memory_format=torch.channels_last)
    assert not crossing[0].is_contiguous()
    with layout.nchw_only():
        nchw_embeddings, nchw_crossing = run_trunk(split, model, images)
    assert nchw_crossing[0].is_contiguous()
    torch.testing.assert_close(crossing[0], nchw_crossing[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(embeddings, nchw_embeddings, rtol=1e-5, atol=1e-6)
