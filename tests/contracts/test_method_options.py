"""Methods taken by name, with their options: a missing or unknown option, or a method an
entry point cannot run, is an ``InputError`` that says what the method needs or takes and
what to use instead, and every call, also one that raises, leaves the model as it was."""

from __future__ import annotations

import pytest
import torch
from model_state import unchanged
from torch import nn

from simexplain import EmbeddingAttribution, InputError, LayerError, explain, retrieval_report
from simexplain.apps.stream import explain_stream
from simexplain.methods import PairClassifierHead, get_method

pytestmark = pytest.mark.usefixtures("one_thread")


class SmallNet(nn.Module):
    """stem -> ``block`` -> head: 1x1 conv, ReLU (``head.1``: globally pooled next), pool,
    flatten, linear. ``block`` is followed by a non-linearity, so it is not pooled."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Sequential(
            nn.Conv2d(16, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(16, dim),
        )

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


@pytest.fixture
def model():
    """Mixed train/eval modes, a frozen parameter and a pre-filled gradient."""
    torch.manual_seed(0)
    net = SmallNet().train()
    net.stem.eval()
    params = list(net.parameters())
    params[0].requires_grad_(False)
    params[1].grad = torch.randn_like(params[1])
    return net


def images(count: int) -> torch.Tensor:
    return torch.randn(count, 3, 16, 16, generator=torch.Generator().manual_seed(count))


ERRORS = {
    "missing head": (
        lambda m: explain(m, images(2), [0, 0], method="bce_gradcam"),
        InputError,
        r"method 'bce_gradcam' needs head=, a trained simexplain\.methods\.PairClassifierHead "
        r"\(see simexplain\.methods\.train_pair_head\); pass it with method='bce_gradcam'",
    ),
    "option another method takes": (
        lambda m: explain(m, images(3), method="stylianou", layer="head.1", point=(1, 1)),
        InputError,
        r"method 'stylianou' takes the options \['coefficients', 'eval_mode', 'head', "
        r"'layout', .*\], not \['point'\]",
    ),
    "unknown option": (
        lambda m: explain(m, images(3), method="psam", radius=2),
        InputError,
        r"method 'psam' takes the options \[.*'reference'.*\], not \['radius'\]",
    ),
    "pair method on a triplet": (
        lambda m: explain(m, images(3), method="bce_gradcam", head=PairClassifierHead(8)),
        InputError,
        "method 'bce_gradcam' explains tuples of 2 images; got 3",
    ),
    "decomposition of a layer that is not pooled": (
        lambda m: explain(m, images(3), method="stylianou", layer="block"),
        LayerError,
        "'stylianou' needs an embedding that is a linear function of the global average",
    ),
    "point outside the image": (
        lambda m: explain(m, images(2), [0, 0], method="point_specific", point=(40, 3)),
        InputError,
        "outside the 16x16 image",
    ),
    "point in a triplet": (
        lambda m: explain(m, images(3), method="point_specific", point=(4, 3)),
        InputError,
        "point= explains a pair",
    ),
    "unknown method": (
        lambda m: explain(m, images(3), method="gradcam"),
        InputError,
        r"unknown explanation method 'gradcam'; choose one of \[.*'stylianou'",
    ),
    "report without the head": (
        lambda m: retrieval_report(m, ["q.png"], ["g.png"], method="bce_gradcam"),
        InputError,
        r"needs head=, .*; a report cannot take it: explain the matches with explain_matches",
    ),
    "captum face of a decomposition": (
        lambda m: EmbeddingAttribution(m, method="stylianou"),
        InputError,
        r"not GradCAM of a per-image score; .* explain\(model, images, labels, "
        r"method='stylianou'\)",
    ),
    "decomposition with forward arguments": (
        lambda m: list(explain_stream(get_method("stylianou").build(m, "head.1"),
                                      [tuple(images(3)[:, None])], progress=False,
                                      additional_forward_args=torch.ones(1))),
        InputError,
        "'stylianou' is a decomposition; it runs the model on the images alone",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_say_what_the_method_needs_and_leave_the_model_unchanged(model, case):
    call, error, match = ERRORS[case]
    with unchanged(model), pytest.raises(error, match=match) as info:
        call(model)
    assert type(info.value) is error


@pytest.mark.parametrize("name", ["stylianou", "point_specific"])
def test_a_decomposition_leaves_the_model_unchanged(model, name):
    with unchanged(model):
        exp = explain(model, images(2), [0, 1], method=name, layer="head.1")
    torch.testing.assert_close(exp.scores, exp.raw_maps.sum(dim=(-2, -1)))
    cosine = (exp.embeddings[0, 0] * exp.embeddings[0, 1]).sum()
    torch.testing.assert_close(exp.scores[0], -cosine.expand(2))  # different: dissimilarity
