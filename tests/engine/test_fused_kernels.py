"""oneDNN's linear kernel where no graph is kept: the rewritten graph computes its
module's function (to float32 rounding), reads the model's own weights, never skips a
hook or a subclass's ``forward``; the engine's maps through it equal the hooked forward's."""

from __future__ import annotations

import dataclasses
from typing import Callable

import pytest
import timm
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import Tensor, fx, nn

from model_state import unchanged
from networks import small_net, tiny_vit
from simexplain.engine import SimilarityEngine, resolve_layer
from simexplain.engine._fused_kernels import fuse_linear_activations, fused_kernels_available
from simexplain.engine._head_only import prefix_for
from simexplain.engine.head_split import cached_split, split_at_layer
from simexplain.engine.input_layout import mostly_linear
from simexplain.methods import SAMScore, get_method
from stored_maps import hooked_attribute

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not fused_kernels_available(), reason="no oneDNN linear kernel"),
]


class Block(nn.Module):
    """Linear, activation, linear: the MLP of a transformer block."""

    def __init__(self, activation: Callable[[Tensor], Tensor], width: int = 8,
                 hidden: int = 16) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), activation, \
            nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _fused(module: nn.Module, **options):
    return fuse_linear_activations(fx.symbolic_trace(module.eval()), **options)


def _assert_same_function(fused, module: nn.Module, x: Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(fused.module(x), module(x), rtol=1e-5, atol=1e-6)


ACTIVATIONS = {
    "GELU": (nn.GELU(), 1),
    "GELU tanh": (nn.GELU(approximate="tanh"), 1),
    "ReLU": (nn.ReLU(), 1),
    "ReLU in place": (nn.ReLU(inplace=True), 1),
    "SiLU": (nn.SiLU(), 1),
    "F.gelu": (F.gelu, 1),
    "F.gelu tanh": (lambda x: F.gelu(x, approximate="tanh"), 1),
    "torch.relu": (torch.relu, 1),
    "F.silu": (F.silu, 1),
    "Tanh (not fused)": (nn.Tanh(), 0),
    "leaky ReLU (not fused)": (nn.LeakyReLU(0.2), 0),
}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_linear_layers_and_their_activations_compute_the_module_function(name):
    activation, fused_activations = ACTIVATIONS[name]
    block = Block(activation)
    fused = _fused(block)
    assert (fused.linear_layers, fused.activations) == (2, fused_activations)
    x = torch.randn(5, 4, 8)
    _assert_same_function(fused, block, x)
    assert not any(n.op == "call_module" and n.target.startswith("fc")
                   for n in fused.module.graph.nodes)  # no call of the model's layers left


def test_an_output_read_twice_keeps_its_activation_apart():
    class Twice(Block):
        def forward(self, x: Tensor) -> Tensor:
            hidden = self.fc1(x)
            return self.fc2(F.gelu(hidden)) + hidden.mean(-1, keepdim=True)

    block = Twice(nn.Identity())
    fused = _fused(block)
    assert (fused.linear_layers, fused.activations) == (2, 0)
    _assert_same_function(fused, block, torch.randn(3, 8))


def test_a_linear_layer_called_with_a_keyword_stays_a_call():
    class Keyword(Block):
        def forward(self, x: Tensor) -> Tensor:
            return self.fc2(self.act(self.fc1(input=x)))

    block = Keyword(nn.GELU())
    fused = _fused(block)
    assert (fused.linear_layers, fused.activations) == (1, 0)
    assert fused.replaced == (block.fc2,)
    _assert_same_function(fused, block, torch.randn(3, 8))


def test_a_linear_subclass_runs_its_own_forward():
    class Doubled(nn.Linear):
        def forward(self, x: Tensor) -> Tensor:
            return 2 * super().forward(x)

    block = Block(nn.GELU())
    block.fc1 = Doubled(8, 16)
    fused = _fused(block)
    assert (fused.linear_layers, fused.activations) == (1, 0)  # fc2 alone
    assert fused.replaced == (block.fc2,)
    _assert_same_function(fused, block, torch.randn(3, 8))


def test_the_model_weights_are_read_at_every_call():
    block = Block(nn.GELU())
    fused = _fused(block)
    assert {id(p) for p in fused.module.parameters()} == {id(p) for p in block.parameters()}
    with torch.no_grad():
        block.fc1.weight.mul_(-3)  # as an optimizer step would
        block.fc2.bias.add_(1)
    _assert_same_function(fused, block, torch.randn(3, 8))


def test_it_is_not_used_where_it_would_compute_something_else():
    block = Block(nn.GELU())
    fused = _fused(block)
    x = torch.randn(3, 8)
    assert fused.usable(x)
    assert not fused.usable(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused.usable(x)
    for module in (block.fc1, block.act, block.fc2):
        handle = module.register_forward_hook(lambda *args: None)
        assert not fused.usable(x)  # the hook would not see the call
        handle.remove()
        pre = module.register_forward_pre_hook(lambda *args: None)
        assert not fused.usable(x)
        pre.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert not fused.usable(x)
    finally:
        handle.remove()
    assert fused.usable(x)


def test_a_module_called_whole_is_rewritten_inside_when_it_traces():
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.out = Block(nn.GELU()), nn.Linear(8, 4)

        def forward(self, x: Tensor) -> Tensor:
            return self.out(self.inner(x))

    class KeepInner(fx.Tracer):
        def is_leaf_module(self, module: nn.Module, name: str) -> bool:
            return name == "inner" or super().is_leaf_module(module, name)

    model = Outer().eval()
    graph_module = fx.GraphModule(model, KeepInner().trace(model))
    x = torch.randn(3, 8)
    without = fuse_linear_activations(graph_module)
    assert (without.linear_layers, without.activations) == (1, 0)
    inside = fuse_linear_activations(graph_module, trace=fx.symbolic_trace)
    assert (inside.linear_layers, inside.activations) == (3, 1)
    assert model.inner in inside.replaced  # a hook on it makes the graph unusable
    _assert_same_function(inside, model, x)
    _assert_same_function(without, model, x)


def test_a_module_that_does_not_trace_stays_a_call():
    class Branching(Block):
        def forward(self, x: Tensor) -> Tensor:
            return self.fc2(self.act(self.fc1(x))) if x.sum() > 0 else -x

    def trace(module: nn.Module) -> fx.GraphModule:
        return fx.symbolic_trace(module)  # raises on the data-dependent branch

    model = nn.Sequential(Branching(nn.GELU()), nn.Linear(8, 8)).eval()
    graph_module = fx.GraphModule(model, _LeafTracer(model[0]).trace(model))
    fused = fuse_linear_activations(graph_module, trace=trace)
    assert fused.linear_layers == 1
    _assert_same_function(fused, model, torch.randn(3, 8).abs())


class _LeafTracer(fx.Tracer):
    def __init__(self, leaf: nn.Module) -> None:
        super().__init__()
        self.leaf = leaf

    def is_leaf_module(self, module: nn.Module, name: str) -> bool:
        return module is self.leaf or super().is_leaf_module(module, name)


def test_nothing_to_rewrite_gives_none(monkeypatch):
    assert fuse_linear_activations(fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3)))) is None
    monkeypatch.setattr("simexplain.engine._fused_kernels.fused_kernels_available",
                        lambda: False)
    assert _fused(Block(nn.GELU())) is None


@settings(max_examples=25, deadline=None)
@given(
    width=st.integers(1, 24), hidden=st.integers(1, 48),
    leading=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    activation=st.sampled_from(["GELU", "GELU tanh", "ReLU", "SiLU", "F.gelu", "Tanh (not fused)"]),
    bias=st.booleans(), seed=st.integers(0, 2**16),
)
def test_any_shape_gives_the_module_function(width, hidden, leading, activation, bias, seed):
    torch.manual_seed(seed)
    block = Block(ACTIVATIONS[activation][0], width, hidden)
    if not bias:
        block.fc1 = nn.Linear(width, hidden, bias=False)
    fused = _fused(block)
    _assert_same_function(fused, block, torch.randn(*leading, width))


# ---------------------------------------------------------------- through the engine

SIZE = 128  # a 4x4 grid after ConvNeXt's stride 32


def tiny_convnext() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("convnext_atto", depths=(1, 1, 1, 1), dims=(8, 16, 24, 32),
                             conv_mlp=False, num_classes=0).eval()


def _triplets(batch: int = 2, size: int = SIZE) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(batch, 3, size, size, generator=g) for _ in range(3))


@pytest.fixture
def split_at_once(monkeypatch):
    monkeypatch.setattr("simexplain.engine._head_only.SPLIT_AFTER_IMAGES", 0)


def test_which_networks_are_mostly_linear():
    assert mostly_linear(tiny_convnext()) and mostly_linear(tiny_vit())
    assert not mostly_linear(small_net())  # its linear head is small beside the convolutions
    assert not mostly_linear(nn.Sequential(nn.Flatten()))


def test_a_convnext_split_at_its_stages_rewrites_inside_the_layer():
    model = tiny_convnext()
    images = torch.randn(2, 3, SIZE, SIZE)
    split = split_at_layer(model, resolve_layer(model, "stages", images), images)
    fused = split.fused_prefix
    assert "fused" in repr(split)
    assert (fused.linear_layers, fused.activations) == (8, 4)  # fc1 + GELU, fc2 per block
    assert model.stages in fused.replaced  # the explained layer is called whole otherwise


@pytest.mark.usefixtures("split_at_once")
@pytest.mark.parametrize("model_fn, size", [(tiny_convnext, SIZE),
                                            (lambda: tiny_vit(img_size=64), 64)])
def test_maps_through_the_rewritten_prefix_equal_the_hooked_forward(model_fn, size):
    model = model_fn()
    explainer = get_method("contribution")(model)
    engine, score = explainer.engine, explainer.score()
    slots = _triplets(size=size)
    with unchanged(model):
        engine.attribute(slots, score)  # splits the model
        split = cached_split(model, engine.feature_layer(slots[0][:2]), slots[0],
                             build=False)
        calls = []
        module = split.fused_prefix.module
        split.fused_prefix = dataclasses.replace(
            split.fused_prefix, module=lambda x: calls.append(len(x)) or module(x))
        fast = engine.attribute(slots, score, relu=False)
    assert calls == [6]  # one pass of the six images, through the rewritten prefix
    hooked = hooked_attribute(engine, slots, score, relu=False)
    peak = float(hooked.maps.abs().max())
    assert peak > 0
    torch.testing.assert_close(fast.maps, hooked.maps, rtol=0, atol=1e-5 * peak)
    torch.testing.assert_close(fast.embeddings, hooked.embeddings, rtol=1e-5, atol=1e-6)


HOOKED_MODULES = {
    # a layer the rewritten prefix replaces by a kernel: the plain prefix calls it
    "a rewritten linear layer": lambda model: model.stages[1].blocks[0].mlp.fc1,
    # a block the rewritten prefix runs inline: the plain prefix calls ``stages`` whole
    "a block inside the traced layer": lambda model: model.stages[2].blocks[0],
}


@pytest.mark.usefixtures("split_at_once")
@pytest.mark.parametrize("where", list(HOOKED_MODULES))
def test_a_hook_the_rewritten_prefix_would_skip_is_honoured(where):
    model = tiny_convnext()
    engine = SimilarityEngine(model)
    slots = _triplets()
    before = engine.attribute(slots, SAMScore(), relu=False)  # splits the model
    split = cached_split(model, engine.feature_layer(slots[0][:2]), slots[0], build=False)
    assert prefix_for(split, torch.cat(slots)) is split.fused_prefix.module
    seen = []
    handle = HOOKED_MODULES[where](model).register_forward_hook(
        lambda module, args, out: seen.append(1) or out * 3)
    try:
        assert prefix_for(split, torch.cat(slots)) is split.prefix
        with_hook = engine.attribute(slots, SAMScore(), relu=False)
        assert seen
        reference = hooked_attribute(engine, slots, SAMScore(), relu=False)
    finally:
        handle.remove()
    torch.testing.assert_close(with_hook.maps, reference.maps, rtol=0,
                               atol=1e-5 * float(reference.maps.abs().max()))
    assert not torch.allclose(with_hook.maps, before.maps)
