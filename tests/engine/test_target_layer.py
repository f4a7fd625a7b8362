"""Layout parsing and layer resolution on small hand-made cases."""

import pytest
import torch
from torch import nn

from simexplain import EmbeddingAttribution, LayerError
from simexplain.engine import FeatureLayer, infer_layout, resolve_layer, to_spatial, token_grid


def test_token_grid_follows_the_image_aspect():
    assert token_grid(196, (224, 224)) == (14, 14)
    assert token_grid(8 * 12, (128, 192)) == (8, 12)
    assert token_grid(197, (224, 224)) is None  # prime: no grid fits a square image
    assert token_grid(0, (32, 32)) is None


def test_infer_layout_cases():
    model = nn.Module()
    assert infer_layout(torch.zeros(2, 512, 7, 7), (224, 224), model) == ("NCHW", 0)
    assert infer_layout(torch.zeros(2, 7, 7, 768), (224, 224), model) == ("NHWC", 0)
    assert infer_layout(torch.zeros(2, 197, 192), (224, 224), model) == ("tokens", 1)
    assert infer_layout(torch.zeros(2, 201, 192), (224, 224), model) == ("tokens", 5)
    assert infer_layout(torch.zeros(2, 512), (224, 224), model) is None
    assert infer_layout((torch.zeros(2, 3),), (224, 224), model) is None
    model.num_prefix_tokens = 4  # registers only: declared metadata wins over the guess
    assert infer_layout(torch.zeros(2, 200, 64), (224, 224), model) == ("tokens", 4)


def test_ambiguous_square_shape_uses_output_fmt():
    model = nn.Module()
    square = torch.zeros(1, 8, 8, 8)
    assert infer_layout(square, (32, 32), model)[0] == "NCHW"
    model.output_fmt = "NHWC"
    assert infer_layout(square, (32, 32), model)[0] == "NHWC"


def test_to_spatial_layouts():
    x = torch.arange(2 * 5 * 3, dtype=torch.float).reshape(1, 5, 6)  # 1 prefix + 2x2 grid
    layer = FeatureLayer("t", nn.Identity(), "tokens", 1)
    out = to_spatial(x, layer, (32, 32))
    assert out.shape == (1, 6, 2, 2)
    torch.testing.assert_close(out[0, :, 0, 1], x[0, 2])
    nhwc = torch.randn(1, 3, 4, 5)
    out = to_spatial(nhwc, FeatureLayer("n", nn.Identity(), "NHWC"), (12, 16))
    torch.testing.assert_close(out, nhwc.permute(0, 3, 1, 2))
    with pytest.raises(LayerError, match="layout="):
        to_spatial(torch.zeros(1, 8, 4), layer, (32, 32))  # 7 patch tokens: no grid


class TokenNet(nn.Module):
    """A tiny ViT-like model: patchify, a class token, a token MLP, mean-pool tokens."""

    def __init__(self, prefix=1):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 8, stride=8)
        self.cls = nn.Parameter(torch.randn(1, prefix, 8))
        self.block = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)
        return self.head(self.block(tokens).mean(dim=1))


def test_discovers_token_layer_and_prefix_without_metadata():
    model = TokenNet(prefix=2)
    layer = resolve_layer(model, None, torch.zeros(1, 3, 32, 48))
    assert (layer.name, layer.layout, layer.num_prefix_tokens) == ("block", "tokens", 2)
    maps = EmbeddingAttribution(model).attribute(tuple(torch.randn(3, 2, 3, 32, 48)))
    assert maps[0].shape == (2, 1, 4, 6)


def test_explicit_overrides():
    model = TokenNet(prefix=1)
    attr = EmbeddingAttribution(model, "block", layout="tokens", num_prefix_tokens=1)
    maps = attr.attribute(tuple(torch.randn(3, 1, 3, 32, 32)))
    assert maps[0].shape == (1, 1, 4, 4)

    def drop_and_grid(t):
        return t[:, 1:].transpose(1, 2).reshape(t.shape[0], 8, 4, 4)

    custom = EmbeddingAttribution(model, "block", reshape_transform=drop_and_grid)

    def triplet():
        return tuple(torch.randn(3, 1, 3, 32, 32, generator=torch.Generator().manual_seed(0)))

    again = custom.attribute(triplet())
    same = attr.attribute(triplet())
    for a, b in zip(again, same):
        torch.testing.assert_close(a, b)


class SharedLayerNet(nn.Module):
    """Calls the same conv block twice; only the second call feeds the embedding spatially."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.block(self.block(x))).flatten(1)


def test_module_called_twice_hooks_the_last_call():
    model = SharedLayerNet()
    layer = resolve_layer(model, None, torch.zeros(1, 3, 16, 16))
    assert layer.name == "block"
    assert layer.call_index == 1
    maps = EmbeddingAttribution(model).attribute(tuple(torch.rand(3, 2, 3, 16, 16)))
    assert maps[0].shape == (2, 1, 16, 16)


def test_discovery_is_cached_per_input_shape():
    model = TokenNet()
    first = resolve_layer(model, None, torch.zeros(1, 3, 32, 32))
    assert resolve_layer(model, None, torch.zeros(4, 3, 32, 32)) is first
    assert resolve_layer(model, None, torch.zeros(1, 3, 64, 64)) is not first


def test_an_explicit_layer_with_a_1x1_output_is_refused():
    from networks import resnet18
    from model_state import unchanged

    model = resnet18()
    with unchanged(model), pytest.raises(LayerError, match=r"'layer4' gives a 1x1 map for a "
                                                         r"32x32 input.*larger images"):
        EmbeddingAttribution(model, "layer4").attribute(tuple(torch.randn(2, 1, 3, 32, 32)))
    maps = EmbeddingAttribution(model, "layer4").attribute(tuple(torch.randn(2, 1, 3, 64, 64)))
    assert maps[0].shape == (1, 1, 2, 2)


def test_an_embedding_that_ignores_the_image_gets_its_own_error():
    """A head at zero (torchvision's ViTs with weights=None): the cause is the head."""
    torch.manual_seed(0)
    head = nn.Linear(8, 4)
    nn.init.zeros_(head.weight)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), head).eval()
    with pytest.raises(LayerError, match="does not depend on the input image.*remove the head"):
        EmbeddingAttribution(model).attribute(tuple(torch.randn(2, 1, 3, 16, 16)))
    nn.init.normal_(head.weight)
    assert EmbeddingAttribution(model).attribute(tuple(torch.randn(2, 1, 3, 16, 16)))[0].shape \
        == (1, 1, 16, 16)
