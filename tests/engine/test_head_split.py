"""Cutting a model at its layer: maps from stored crossing values equal the full forward's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from networks import conv_net, tiny_vit
from simexplain.apps.index.storage import decode_rows, encode_rows
from stored_maps import FLOAT16_TOLERANCE, relative_error, stored_and_full
from simexplain.engine import SimilarityEngine
from simexplain.engine.head_split import SplitFallback, split_at_layer
from simexplain.engine.stored import attribute_against, head_split, run_trunk
from simexplain.methods import get_method

@pytest.mark.parametrize("method", ["contribution", "gradcam_cosine", "sam"])
def test_cnn_maps_from_stored_activations_equal_full_forward(method):
    images = torch.randn(2, 3, 3, 16, 16)
    full, stored, split = stored_and_full(conv_net(), images, method)
    assert split
    assert split.names == ("act",)
    assert full.maps.shape == (3, 2, 8, 8)
    torch.testing.assert_close(stored.maps, full.maps, rtol=0, atol=1e-6)
    torch.testing.assert_close(stored.scores, full.scores)
    torch.testing.assert_close(stored.embeddings, full.embeddings)


def test_transformer_cut_keeps_the_residual_stream():
    model = tiny_vit(img_size=64)
    full, stored, split = stored_and_full(model, torch.randn(2, 2, 3, 64, 64))
    # norm1's output and the residual entering the last block both cross the cut
    assert len(split.names) == 2 and split.names[split.activation_index] == "blocks_1_norm1"
    assert full.maps.shape[-2:] == (4, 4)
    assert relative_error(stored.maps, full.maps) < 1e-5


def test_float16_storage_stays_within_the_stated_tolerance():
    model = tiny_vit(img_size=64)
    full, stored, _ = stored_and_full(model, torch.randn(2, 2, 3, 64, 64), dtype=torch.float16)
    error = relative_error(stored.maps, full.maps)
    assert 0 < error < FLOAT16_TOLERANCE


def test_scales_keep_tiny_and_huge_activations_in_float16():
    values = torch.tensor([[1e-12, -3e-12, 2e-13], [7e8, 3e8, -2e8]])
    stored, scale = encode_rows(values, torch.float16)
    assert torch.isfinite(stored).all()
    torch.testing.assert_close(decode_rows(stored, scale), values, rtol=1e-3, atol=0)


class InPlaceHead(nn.Module):
    """The head writes into the layer's output (torchvision's DenseNet does)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        features = self.conv(x)
        return self.fc(F.relu(features, inplace=True).mean((2, 3)))


def test_a_head_writing_into_the_layer_output_leaves_the_stored_value_intact():
    full, stored, _ = stored_and_full(InPlaceHead().eval(), torch.randn(2, 2, 3, 16, 16))
    assert (full.maps < 0).any()  # the activation before the in-place ReLU was explained
    torch.testing.assert_close(stored.maps, full.maps, rtol=0, atol=1e-6)


class BranchOnData(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        features = self.conv(x)
        if features.sum() > 0:  # data-dependent control flow: fx cannot trace it
            features = features * 2
        return features.mean((2, 3))


class BatchSizeFromInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        count = x.shape[0]
        return self.conv(x).mean((2, 3)).reshape(count, -1)


@pytest.mark.parametrize("model, reason", [
    (BranchOnData(), "torch.fx cannot trace the model"),
    (BatchSizeFromInput(), "crosses the cut at the layer and is int"),
])
def test_models_that_do_not_split_say_why(model, reason):
    engine = SimilarityEngine(model, "conv")
    images = torch.randn(2, 3, 8, 8)
    layer = engine.feature_layer(images)
    split = split_at_layer(model, layer, images)
    assert isinstance(split, SplitFallback) and not split
    assert reason in split.reason and "\n" not in split.reason


def test_splitting_leaves_the_model_as_it_was():
    model = conv_net().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer, split = head_split(SimilarityEngine(model, "act"), torch.randn(2, 3, 16, 16))
    assert split and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks for m in model.modules())


def test_a_partner_given_as_an_embedding_gives_the_pair_map():
    model = conv_net()
    images = torch.randn(2, 3, 3, 16, 16)
    explainer = get_method("contribution")(model)
    score = explainer.score(torch.ones(3, dtype=torch.bool))
    full = explainer.engine.attribute((images[0], images[1]), score, relu=True)
    layer, split = head_split(explainer.engine, images[0])
    partners, _ = run_trunk(split, model, images[0])
    _, crossing = run_trunk(split, model, images[1])
    maps, scores = attribute_against(explainer.engine, split, layer, partners, crossing,
                                     score, (16, 16))
    torch.testing.assert_close(maps, full.maps[:, 1], rtol=0, atol=1e-6)
    torch.testing.assert_close(scores, full.scores[:, 1])
