"""``output=``: models that return more than the embedding (a dict, a tuple, a dataclass, a
Hugging Face ``ModelOutput``) are explained through the embedding it picks, by every entry
point that runs a model, and the errors say how to pick it."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, namedtuple
from typing import Any, Optional

import pytest
import torch
from torch import Tensor, nn

from model_state import unchanged
from networks import small_net
from simexplain import (
    EmbeddingAttribution,
    InputError,
    ModelForwardError,
    ModelOutputError,
    SAMLoss,
    explain,
)
from simexplain.engine.outputs import PickOutput, select_output

pytestmark = pytest.mark.usefixtures("one_thread")

Pair = namedtuple("Pair", ["embedding", "feature_map"])


@dataclasses.dataclass
class Features:
    """A plain dataclass output."""

    feature_map: Tensor
    embedding: Tensor


@dataclasses.dataclass
class FakeModelOutput(OrderedDict):
    """What Hugging Face's ``ModelOutput`` is: a dataclass and an ordered dict of the fields
    that are set, indexed like the tuple of those fields."""

    last_hidden_state: Optional[Tensor] = None
    hidden_states: Optional[Tensor] = None
    pooler_output: Optional[Tensor] = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None:
                self[field.name] = value

    def __getitem__(self, key: Any) -> Any:
        return self.to_tuple()[key] if isinstance(key, int) else super().__getitem__(key)

    def to_tuple(self) -> tuple:
        return tuple(self[k] for k in self.keys())


#: kind -> (how the model returns (embedding, feature map), output=)
KINDS = {
    "dict by key": (lambda e, f: {"embedding": e, "feature_map": f}, "embedding"),
    "tuple by index": (lambda e, f: (f, e), 1),
    "list by negative index": (lambda e, f: [f, e], -1),
    "namedtuple by key": (lambda e, f: Pair(e, f), "embedding"),
    "dataclass by attribute": (lambda e, f: Features(f, e), "embedding"),
    "ModelOutput by key": (lambda e, f: FakeModelOutput(f, None, e), "pooler_output"),
    "ModelOutput by index": (lambda e, f: FakeModelOutput(f, None, e), 1),
    "callable": (lambda e, f: {"out": (f, e)}, lambda out: out["out"][1]),
}


class Returns(nn.Module):
    """``small_net`` (its layers under ``net.``) whose embedding comes back inside ``pack``."""

    def __init__(self, pack):
        super().__init__()
        self.net = small_net()
        self.pack = pack

    def forward(self, x: Tensor) -> Any:
        feature_map = self.net[:5](x)
        return self.pack(self.net[5:](feature_map), feature_map)


def packed(kind: str) -> tuple[nn.Module, nn.Module, Any]:
    pack, output = KINDS[kind]
    model = Returns(pack).eval()
    return model, model.net, output


def triplets() -> tuple[Tensor, ...]:
    return tuple(torch.randn(3, 2, 3, 12, 12, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("kind", list(KINDS))
def test_attribution_through_output_equals_the_bare_embedding(kind):
    model, bare, output = packed(kind)
    with unchanged(model):
        got = EmbeddingAttribution(model, output=output).attribute(triplets())
    expected = EmbeddingAttribution(bare).attribute(triplets())
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["contribution", "sam", "stylianou"])
def test_explain_takes_output_for_every_kind_of_method(method):
    model, bare, output = packed("dict by key")
    images = torch.randn(3, 3, 12, 12)
    got = explain(model, images, [0, 0, 1], method=method, output=output)
    expected = explain(bare, images, [0, 0, 1], method=method)
    assert got.layer == f"net.{expected.layer}"
    torch.testing.assert_close(got.raw_maps, expected.raw_maps, rtol=0, atol=0)
    torch.testing.assert_close(got.embeddings, expected.embeddings, rtol=0, atol=0)


@pytest.mark.parametrize("gamma", [0.0, 0.25])
def test_sam_loss_trains_through_output(gamma):
    model, bare, output = packed("ModelOutput by key")
    reference = torch.randn(4, 3, 12, 12)
    losses = []
    for net, options in ((model, {"output": output, "layer": "net.3"}), (bare, {"layer": "3"})):
        criterion = SAMLoss(net, nn.TripletMarginLoss(), gamma=gamma, reference=reference,
                            **options)
        losses.append(criterion(triplets()))
    torch.testing.assert_close(losses[0], losses[1])
    losses[0].backward()
    assert model.net[0].weight.grad is not None


def test_pick_output_wraps_a_model_for_code_that_calls_it():
    model, bare, output = packed("tuple by index")
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(PickOutput(model, output)(x), bare(x))


# ------------------------------------------------------------------------------ errors


def test_an_unpicked_output_names_output_and_suggests_the_key():
    model, _, _ = packed("dict by key")
    match = (r"the model returned a dict with 'embedding' \(tensor \(2, 6\)\), 'feature_map' "
             r"\(tensor \(2, 8, 12, 12\)\), not a tensor of embeddings\. Pick the embedding "
             r"with output= \(e\.g\. output='embedding'")
    with unchanged(model), pytest.raises(ModelOutputError, match=match):
        EmbeddingAttribution(model).attribute(triplets()[:2], target=True)
    model, _, _ = packed("tuple by index")
    with unchanged(model), pytest.raises(ModelOutputError, match=r"a tuple of 2: .*output=1"):
        explain(model, torch.randn(3, 3, 12, 12))


@pytest.mark.parametrize(
    "output, error, match",
    [
        ("embeddings", ModelOutputError,
         r"output='embeddings' picks nothing from the model's output, a dict with "
         r"'embedding'.*; try output='embedding'"),
        (5, ModelOutputError, r"output=5 picks nothing from the model's output"),
        (lambda out: out[0], ModelOutputError,
         r"output=<lambda> raised KeyError on the model's output, a dict with 'embedding'"),
        (lambda out: out["embedding"].tolist(), ModelOutputError,
         r"output=<lambda> picked a list of 2: .*, not a tensor of embeddings; the model's "
         r"output is a dict with 'embedding'"),
        (1.5, InputError, r"output must pick the embedding from the model's output: a key, an "
                          r"index, or a callable such as lambda out: out.pooler_output; got float"),
    ],
)
def test_a_wrong_output_is_a_clear_error(output, error, match):
    model, _, _ = packed("dict by key")
    with unchanged(model), pytest.raises(error, match=match):
        EmbeddingAttribution(model, output=output).attribute(triplets())


@pytest.mark.parametrize("entry", ["explain", "EmbeddingAttribution", "SAMLoss"])
def test_a_function_as_model_says_gradient_methods_need_the_module(entry):
    model, _, _ = packed("dict by key")
    function = lambda x: model(x)["embedding"]  # noqa: E731
    calls = {
        "explain": lambda: explain(function, torch.randn(3, 3, 12, 12)),
        "EmbeddingAttribution": lambda: EmbeddingAttribution(function),
        "SAMLoss": lambda: SAMLoss(function, nn.TripletMarginLoss()),
    }
    match = (r"model must be a torch.nn.Module, got function; gradient methods need a PyTorch "
             r"module: they hook the network's layers, so pass the network itself.*pick the "
             r"embedding with output=.*The black-box methods, method='rise' or method='sbsm', "
             r"take any callable images -> embeddings")
    with pytest.raises(TypeError, match=match):
        calls[entry]()


def test_select_output_leaves_a_plain_output_alone():
    x = torch.zeros(2, 3)
    assert select_output(x, None) is x


# ------------------------------------------------------------------------ grey images


def test_grey_images_for_a_colour_model_say_how_to_repeat_the_channel():
    model = small_net().eval()
    grey = torch.rand(3, 1, 12, 12)
    match = (r"The images have 1 channel but the model's first convolution \(0\) takes 3: "
             r"repeat the grey channel: x\.repeat\(1, 3, 1, 1\) \(or x\.expand\(-1, 3, -1, -1\)")
    with unchanged(model), pytest.raises(ModelForwardError, match=match):
        explain(model, grey, [0, 0, 1])
    with unchanged(model), pytest.raises(ModelForwardError, match=match):
        EmbeddingAttribution(model).attribute(tuple(grey[:, None]))
    rgba = torch.rand(3, 4, 12, 12)
    with unchanged(model), pytest.raises(ModelForwardError, match=r"drop the alpha channel"):
        explain(model, rgba, [0, 0, 1])
    explain(model, grey.repeat(1, 3, 1, 1), [0, 0, 1])  # the advice works
