"""The structural facts behind simexplain's speed, checked on real architectures (not timed).

``test_state.py`` covers the saved-tensor count against the trunk's depth on a small net,
``.grad`` restoration by identity, and memory growth over many calls. This file adds, on
torchvision's ResNet-18 (64 px) and a two-block timm ViT:

* no parameter gradient is ever computed or accumulated during ``attribute`` (hooks on
  every parameter; restoring ``.grad`` afterwards would hide a fill, so it is caught
  while it happens);
* the trunk before the explained layer runs without grad and saves no tensor for
  backward: every saved tensor is at most the size of the layer's output, and the number
  saved equals what the layers after the target (and the score) save when run alone;
* nothing of the call stays alive once it returns: the hooked activation, the leaf made
  from it, the embeddings and the graph between them are freed by reference counting
  alone (no garbage-collector cycle needed).
"""

from __future__ import annotations

import gc
import weakref
from collections import Counter
from contextlib import contextmanager

import pytest
import torch
from torch import Tensor, nn

from networks import resnet18, tiny_vit
from simexplain import EmbeddingAttribution

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64
BATCH = 2


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    return resnet18()


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    return tiny_vit()


def triplet(size: int = SIZE) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(BATCH, 3, size, size, generator=g) for _ in range(3))


@contextmanager
def saved_tensors(model: nn.Module):
    """Record every tensor autograd saves for backward inside the block, as (shape, is_param)."""
    params = {p.data_ptr() for p in model.parameters()}
    shapes: list[tuple[tuple[int, ...], bool]] = []

    def pack(t):
        shapes.append((tuple(t.shape), t.data_ptr() in params))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield shapes


# ----------------------------------------------------------------- no parameter gradients


@contextmanager
def parameter_gradient_watch(model: nn.Module):
    """Count gradients computed for (``register_hook``) or accumulated into (``.grad``) params."""
    events = {"computed": 0, "accumulated": 0}
    handles = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        handles.append(
            p.register_hook(lambda g: events.__setitem__("computed", events["computed"] + 1))
        )
        handles.append(
            p.register_post_accumulate_grad_hook(
                lambda p: events.__setitem__("accumulated", events["accumulated"] + 1)
            )
        )
    try:
        yield events
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("layer", ["layer4", "layer3"])
def test_no_parameter_gradient_is_computed(resnet, layer):
    attr = EmbeddingAttribution(resnet, layer)
    x = triplet()
    attr.attribute(x)  # warm-up: layer discovery probes once
    with parameter_gradient_watch(resnet) as events:
        attr.attribute(x)
        attr.attribute_tuples(x, chunk_size=1)
    assert events == {"computed": 0, "accumulated": 0}
    assert all(p.grad is None for p in resnet.parameters())
    # the watch does see a plain backward (control)
    with parameter_gradient_watch(resnet) as events:
        resnet(x[0]).sum().backward()
    assert events["computed"] > 0 and events["accumulated"] > 0
    resnet.zero_grad(set_to_none=True)


def test_no_parameter_gradient_on_a_vit(vit):
    attr = EmbeddingAttribution(vit)
    x = triplet(32)
    attr.attribute(x)
    with parameter_gradient_watch(vit) as events:
        attr.attribute(x)
    assert events == {"computed": 0, "accumulated": 0}


# ------------------------------------------------------------ no graph before the layer


def _after_layer3(model: nn.Module, x: Tensor) -> Tensor:
    """torchvision ResNet.forward from layer3's output on."""
    return _after_layer4(model, model.layer4(x))


def _after_layer4(model: nn.Module, x: Tensor) -> Tensor:
    return model.fc(torch.flatten(model.avgpool(x), 1))


AFTER = {  # the layers after the target, and the target's output shape at 64 px
    "layer4": (_after_layer4, (3 * BATCH, 512, 2, 2)),
    "layer3": (_after_layer3, (3 * BATCH, 256, 4, 4)),
}


def test_resnet_trunk_saves_nothing(resnet):
    x = triplet()
    overhead = {}
    for layer, (head, act_shape) in AFTER.items():
        attr = EmbeddingAttribution(resnet, layer)
        attr.attribute(x)  # warm-up: layer discovery probes once
        with saved_tensors(resnet) as during:
            attr.attribute(x)
        # what the layers after the target save when run alone, from a leaf
        with saved_tensors(resnet) as alone:
            head(resnet, torch.randn(act_shape, requires_grad=True))
        assert alone, "the layers after the target must save something"
        # every activation saved is no larger than the layer's output: nothing from the
        # trunk (layer1 at 16x16, layer2 at 8x8, ...) is kept for backward
        act_numel = torch.Size(act_shape).numel()
        activations = [s for s, is_param in during if not is_param]
        assert max(torch.Size(s).numel() for s in activations) <= act_numel, sorted(set(during))
        # all that the layers after the target save is saved, plus simexplain's own
        # score and map arithmetic
        missing = Counter(alone) - Counter(during)
        assert not missing, missing
        overhead[layer] = Counter(during) - Counter(alone)
        # while a forward in grad mode through the whole model saves far more, and larger
        with saved_tensors(resnet) as full:
            resnet(torch.cat(x))
        assert len(full) > 2 * len(during)
        assert max(torch.Size(s).numel() for s, is_param in full if not is_param) > act_numel
    # the extra is the score's and the map's bookkeeping, the same whatever the layer: the
    # trunk before the layer contributes nothing, the layers after it exactly their share
    small = {s for s in overhead["layer3"]} | {s for s in overhead["layer4"]}
    assert sum(overhead["layer4"].values()) == sum(overhead["layer3"].values()), overhead
    assert sum(overhead["layer4"].values()) <= 20, overhead
    assert all(not is_param and torch.Size(s).numel() <= 3 * BATCH * 512 for s, is_param in small)


def test_trunk_outputs_do_not_require_grad(resnet):
    """The modules before the layer run in no-grad mode; the ones after in grad mode."""
    seen: dict[str, bool] = {}
    handles = [
        getattr(resnet, name).register_forward_hook(
            lambda m, i, o, name=name: seen.__setitem__(name, o.requires_grad)
        )
        for name in ("conv1", "layer1", "layer2", "layer3", "avgpool", "fc")
    ]
    try:
        EmbeddingAttribution(resnet, "layer3").attribute(triplet())
        seen.clear()
        EmbeddingAttribution(resnet, "layer3").attribute(triplet())
    finally:
        for h in handles:
            h.remove()
    assert seen == {
        "conv1": False, "layer1": False, "layer2": False,
        "layer3": False,  # the layer's own output: our hook replaces it by a leaf after
        "avgpool": True, "fc": True,
    }  # fmt: skip


def test_vit_trunk_saves_nothing(vit):
    attr = EmbeddingAttribution(vit)
    x = triplet(32)
    attr.attribute(x)
    layer = attr.feature_layer(x[0])
    assert layer.name == "blocks.1.norm1"
    seen = {}
    handle = vit.blocks[0].register_forward_hook(
        lambda m, i, o: seen.update(b0=o.requires_grad)  # returns None: output unchanged
    )
    try:
        with saved_tensors(vit) as during:
            attr.attribute(x)
    finally:
        handle.remove()
    assert seen == {"b0": False}
    with saved_tensors(vit) as full:
        vit(torch.cat(x))
    # only the second block's attention and MLP (and the score) save tensors: about half
    # of what a grad-mode forward through both blocks saves
    assert 0 < len(during) < 0.75 * len(full), (len(during), len(full))


# ------------------------------------------------------------ nothing referenced after


def _watch_call(model: nn.Module, attr: EmbeddingAttribution, x, after: nn.Module):
    """Run attribute and return weakrefs to the tensors the call made along the way."""
    refs: dict[str, weakref.ref] = {}

    def on_layer_input(module, inputs):  # ``after`` receives the hook's clone of the leaf
        clone = inputs[0]
        if clone.requires_grad and "clone" not in refs:
            refs["clone"] = weakref.ref(clone)
            leaf = clone.grad_fn.next_functions[0][0].variable
            refs["leaf"] = weakref.ref(leaf)

    def on_model_output(module, inputs, output):
        refs.setdefault("embeddings", weakref.ref(output))

    def on_layer_output(module, inputs, output):
        refs.setdefault("activation", weakref.ref(output))

    layer = attr.feature_layer(x[0]).module
    handles = [
        after.register_forward_pre_hook(on_layer_input),
        model.register_forward_hook(on_model_output),
        layer.register_forward_hook(on_layer_output),
    ]
    saved: list[weakref.ref] = []

    def pack(t):
        # A new tensor object per saved tensor, owned by the graph alone: it dies with the
        # graph. (Returning ``t`` itself would make a saved output refer to itself through
        # its grad_fn, a cycle of the test's own making.)
        held = t.detach()
        saved.append(weakref.ref(held))
        return held

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            maps = attr.attribute(x)
    finally:
        for h in handles:
            h.remove()
    for i, r in enumerate(saved):
        refs[f"saved tensor {i}"] = r
    return refs, maps


@pytest.mark.parametrize("layer, after", [("layer4", "avgpool"), ("layer3", "layer4")])
def test_nothing_stays_referenced(resnet, layer, after):
    attr = EmbeddingAttribution(resnet, layer)
    x = triplet()
    attr.attribute(x)  # warm-up
    gc.collect()
    gc.disable()  # reference counting alone must free everything
    try:
        refs, maps = _watch_call(resnet, attr, x, getattr(resnet, after))
        assert {"clone", "leaf", "embeddings", "activation", "saved tensor 0"} <= set(refs)
        alive = [name for name, r in refs.items() if r() is not None]
    finally:
        gc.enable()
    assert alive == [], f"still referenced after the call: {alive}"
    assert all(m.grad_fn is None for m in maps)
