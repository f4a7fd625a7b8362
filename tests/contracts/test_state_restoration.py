"""After every call, also one that raises, the model and torch are exactly as they were.

Checked per module: train/eval mode, ``requires_grad`` and ``.grad`` of every parameter
(object identity and values), parameter values and buffers (BatchNorm running stats), and
every hook dictionary; globally: grad mode and the global module hooks. Also: no memory
growth over many calls, no autograd graph kept, and no graph built through the trunk
before the explained layer.
"""

from __future__ import annotations

import gc
import weakref
from contextlib import contextmanager

import pytest
import timm
import torch
import torchvision
from model_state import unchanged
from torch import nn

from simexplain import (
    EmbeddingAttribution,
    InputError,
    LayerError,
    ModelForwardError,
    ModelOutputError,
    explain,
)

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = {"pair": 2, "triplet": 3, "quadruplet": 4}


class SmallNet(nn.Module):
    """stem -> body (``depth`` conv blocks) -> block (the explained layer) -> head."""

    def __init__(self, depth: int = 2, dim: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(
            *[
                nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
                for _ in range(depth)
            ]
        )
        self.block = nn.Sequential(
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.head = nn.Sequential(
            nn.Conv2d(16, 16, 1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, dim),
        )
        self.unused = nn.Linear(3, 3)  # never called
        self.fail = False

    def forward(self, x):
        x = self.block(self.body(self.stem(x)))
        if self.fail:
            raise RuntimeError("boom after the hooked layer")
        return self.head(x)


def prepared(model: nn.Module) -> tuple[nn.Module, dict]:
    """Put ``model`` in an unusual state: mixed modes, frozen params, .grad set, user hooks.

    Returns the model and counters of the user hooks' calls.
    """
    model.train()
    children = list(model.children())
    children[1].eval()  # mixed: train() overall, one submodule in eval
    params = list(model.parameters())
    for p in params[:2]:
        p.requires_grad_(False)  # frozen
    for i, p in enumerate(params):
        if i % 3 == 1:
            p.grad = torch.randn_like(p)  # pre-filled gradients
    calls = {"forward": 0, "pre": 0, "backward": 0}

    def forward_hook(module, inputs, output):
        calls["forward"] += 1

    def pre_hook(module, inputs):
        calls["pre"] += 1

    def backward_hook(module, grad_in, grad_out):
        calls["backward"] += 1

    model.register_forward_hook(forward_hook)
    children[0].register_forward_pre_hook(pre_hook)
    children[0].register_full_backward_hook(backward_hook)
    return model, calls


def images(count: int, batch: int = 2, size: int = 16) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(batch, 3, size, size) for _ in range(count))


def target_for(count: int, batch: int = 2):
    return torch.tensor([True, False][:batch]) if count == 2 else None


def labels_for(count: int):
    return {2: [0, 1], 3: [0, 0, 1], 4: [0, 0, 1, 2]}[count]


@pytest.fixture
def net():
    return prepared(SmallNet())


# ------------------------------------------------------- success: every kind, both entry points


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("grad_mode", ["default", "no_grad", "enable_grad"])
def test_attribute_leaves_model_unchanged(net, kind, grad_mode):
    model, calls = net
    count = KINDS[kind]
    attr = EmbeddingAttribution(model, "block", method="sam")
    context = {
        "default": torch.enable_grad,
        "no_grad": torch.no_grad,
        "enable_grad": torch.enable_grad,
    }
    with context[grad_mode]():
        for _ in range(2):  # the first call also finds the layer, the second uses the cache
            with unchanged(model):
                maps = attr.attribute(images(count), target=target_for(count))
    assert len(maps) == count
    assert all(m.shape == (2, 1, 8, 8) for m in maps)
    assert calls["forward"] > 0 and calls["pre"] > 0  # user hooks fired during the calls


@pytest.mark.parametrize("kind", list(KINDS))
def test_explain_leaves_model_unchanged(net, kind):
    model, _ = net
    count = KINDS[kind]
    with unchanged(model):
        exp = explain(model, torch.randn(count, 3, 16, 16), labels=labels_for(count), layer="block")
    assert exp.maps.shape == (1, count, 16, 16)
    with torch.no_grad(), unchanged(model):
        explain(
            model, torch.randn(2, count, 3, 16, 16), labels=[labels_for(count)] * 2, layer="block"
        )
    with unchanged(model):  # automatic layer
        explain(model, torch.randn(count, 3, 16, 16), labels=labels_for(count))


def test_user_hooks_keep_firing_and_ours_are_gone(net):
    model, calls = net
    attr = EmbeddingAttribution(model, "block", method="sam")
    attr.attribute(images(3))  # warm-up: finds the layer
    hooks_before = {name: len(m._forward_hooks) for name, m in model.named_modules()}
    seen = []
    handle = model.block.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    attr.attribute(images(3))
    assert seen == [(6, 16, 8, 8)]  # one forward pass of all 6 images; the user's hook saw it
    handle.remove()
    assert {name: len(m._forward_hooks) for name, m in model.named_modules()} == hooks_before
    before = dict(calls)
    with torch.no_grad():
        model(torch.randn(1, 3, 16, 16))
    assert calls["forward"] == before["forward"] + 1
    assert calls["pre"] == before["pre"] + 1
    # the user's full backward hook still fires on a user backward pass
    model.eval()
    x = torch.randn(1, 3, 16, 16, requires_grad=True)
    model(x).sum().backward()
    assert calls["backward"] == before["backward"] + 1


def test_batchnorm_running_stats_unchanged_in_train_mode():
    model = SmallNet()
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 16, 16))  # non-default running stats
    bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    stats = [
        (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bn
    ]
    EmbeddingAttribution(model, "block", method="sam").attribute(images(3))
    explain(model, torch.randn(3, 3, 16, 16), labels=[1, 1, 2])
    explain(model, torch.randn(2, 3, 16, 16), labels=[1, 1])
    for m, (mean, var, count) in zip(bn, stats):
        assert torch.equal(m.running_mean, mean)
        assert torch.equal(m.running_var, var)
        assert torch.equal(m.num_batches_tracked, count)
    assert all(m.training for m in model.modules())


def test_eval_mode_is_used_during_the_call():
    model = SmallNet()
    model.train()
    modes = []
    model.block.register_forward_hook(
        lambda m, i, o: modes.append((m.training, model.stem[1].training))
    )
    EmbeddingAttribution(model, "block", method="sam").attribute(images(3))
    assert modes and all(mode == (False, False) for mode in modes)
    assert all(m.training for m in model.modules())


def test_resnet18_state_unchanged():
    torch.manual_seed(0)
    model, _ = prepared(torchvision.models.resnet18(num_classes=8))
    for count in (2, 3, 4):
        with unchanged(model):
            EmbeddingAttribution(model, "layer4", method="sam").attribute(
                images(count, size=64), target=target_for(count)
            )
    with unchanged(model):
        explain(model, torch.randn(3, 3, 64, 64), labels=[0, 0, 1])


def test_vit_state_unchanged():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=0)
    model, _ = prepared(model)
    for count in (2, 3, 4):
        with unchanged(model):
            maps = EmbeddingAttribution(model, method="sam").attribute(
                images(count, size=32), target=target_for(count)
            )
        assert maps[0].shape == (2, 1, 2, 2)
    with unchanged(model):
        explain(model, torch.randn(4, 3, 32, 32), labels=[0, 0, 1, 2])


# ---------------------------------------------------------------------------- failures


def _weight_fn_wrong_shape(model):
    EmbeddingAttribution(model, "block", method="sam").attribute(
        images(3), weight_fn=lambda a, p, n: a[:, :3])


def _fail_in_forward_cached(model):
    attr = EmbeddingAttribution(model, "block", method="sam")
    attr.attribute(images(3))  # layer found and cached
    model.fail = True
    try:
        attr.attribute(images(3))  # raises inside forward, after our hook ran
    finally:
        model.fail = False


def _fail_in_forward_probe(model):
    model.fail = True
    try:
        EmbeddingAttribution(model, method="sam").attribute(images(3))
    finally:
        model.fail = False


def _nan_embeddings(model):
    bias = model.head[-1].bias.data
    original = bias[0].item()
    bias[0] = float("nan")
    try:
        EmbeddingAttribution(model, "block", method="sam").attribute(images(3))
    finally:
        bias[0] = original


FAILURES = {
    "forward raises after hooked layer": (_fail_in_forward_cached, ModelForwardError),
    "forward raises while finding the layer": (_fail_in_forward_probe, ModelForwardError),
    "nan input": (
        lambda m: EmbeddingAttribution(m, "block", method="sam").attribute(
            (torch.full((2, 3, 16, 16), float("nan")),) + images(2)
        ),
        InputError,
    ),
    "wrong layer name": (
        lambda m: EmbeddingAttribution(m, "blok", method="sam").attribute(images(3)),
        LayerError,
    ),
    "wrong layer name in explain": (
        lambda m: explain(m, torch.randn(3, 3, 16, 16), layer="blok"),
        LayerError,
    ),
    "foreign module": (
        lambda m: EmbeddingAttribution(m, nn.Conv2d(3, 3, 1), method="sam").attribute(images(3)),
        LayerError,
    ),
    "layer not called": (
        lambda m: EmbeddingAttribution(m, "unused", method="sam").attribute(images(3)),
        LayerError,
    ),
    "non-spatial layer": (
        lambda m: EmbeddingAttribution(m, "head.4", method="sam").attribute(images(3)),
        LayerError,
    ),
    "weight_fn wrong shape": (_weight_fn_wrong_shape, InputError),
    "nan embeddings": (_nan_embeddings, ModelOutputError),
    "pair without target": (
        lambda m: EmbeddingAttribution(m, "block", method="sam").attribute(images(2)),
        InputError,
    ),
    "chunk_size 0": (
        lambda m: EmbeddingAttribution(m, "block", method="sam").attribute(images(3), chunk_size=0),
        InputError,
    ),
    "explain labels inconsistent": (
        lambda m: explain(m, torch.randn(3, 3, 16, 16), labels=[0, 1, 1], layer="block"),
        InputError,
    ),
}


@pytest.mark.parametrize("grad_mode", ["enabled", "disabled"])
@pytest.mark.parametrize("case", list(FAILURES))
def test_failing_call_leaves_model_unchanged(case, grad_mode):
    model, calls = prepared(SmallNet())
    call, error = FAILURES[case]
    with torch.set_grad_enabled(grad_mode == "enabled"):
        with unchanged(model), pytest.raises(error):
            call(model)
        assert torch.is_grad_enabled() == (grad_mode == "enabled")
    # the model still works and nothing of ours fires any more
    fired = calls["forward"]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 16, 16))
    assert out.shape == (1, 8) and torch.isfinite(out).all()
    assert calls["forward"] == fired + 1
    assert len(model._forward_hooks) == 1  # the user's
    assert all(len(m._forward_hooks) == 0 for m in list(model.modules())[1:])


# --------------------------------------------------------------------------- grad mode


def test_grad_mode_restored_and_results_identical():
    model = SmallNet().eval()
    attr = EmbeddingAttribution(model, "block", method="sam")
    x = images(3)
    reference = attr.attribute(x)
    with torch.no_grad():
        under_no_grad = attr.attribute(x)
        assert not torch.is_grad_enabled()
    with torch.enable_grad():
        under_enable_grad = attr.attribute(x)
        assert torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    try:
        plain_disabled = attr.attribute(x)
        assert not torch.is_grad_enabled()
    finally:
        torch.set_grad_enabled(True)
    for maps in (under_no_grad, under_enable_grad, plain_disabled):
        for a, b in zip(maps, reference):
            assert torch.equal(a, b)
    assert reference[0].abs().sum() > 0


def test_under_inference_mode():
    """Under torch.inference_mode() the maps are the same, or the error names inference_mode
    (not a misleading LayerError about the layer)."""
    model = SmallNet().eval()
    attr = EmbeddingAttribution(model, "block", method="sam")
    x = images(3)
    reference = attr.attribute(x)
    with torch.inference_mode():
        try:
            maps = attr.attribute(x)
        except Exception as error:  # noqa: BLE001 - the message is what is checked
            assert "inference_mode" in str(error), f"{type(error).__name__}: {error}"
        else:
            for a, b in zip(maps, reference):
                assert torch.equal(a, b)
        assert torch.is_inference_mode_enabled()


def test_user_backward_hook_on_the_explained_layer():
    model = SmallNet().eval()
    attr = EmbeddingAttribution(model, "block", method="sam")
    x = images(3)
    reference = attr.attribute(x)
    seen = []
    model.block.register_full_backward_hook(lambda m, gi, go: seen.append(go[0].shape))
    with unchanged(model), pytest.warns(UserWarning, match="Full backward hook"):
        maps = attr.attribute(x)
    assert seen == [(6, 16, 8, 8)]
    for a, b in zip(maps, reference):
        assert torch.equal(a, b)


def test_captum_sensitivity_metric_runs():
    """captum's metrics call the explanation function under no_grad."""
    from captum.metrics import sensitivity_max

    model = SmallNet().eval()
    attr = EmbeddingAttribution(model, "block", method="sam")
    x = images(3, size=16)
    with unchanged(model):
        sens = sensitivity_max(attr.attribute, x, n_perturb_samples=2, perturb_radius=0.01)
    assert sens.shape == (2,) and torch.isfinite(sens).all()
    assert torch.is_grad_enabled()


# ----------------------------------------------------------------- no graph, no memory growth


def test_results_carry_no_graph_by_default():
    model = SmallNet().eval()
    attr = EmbeddingAttribution(model, "block", method="sam")
    for maps in (attr.attribute(images(3)), attr.attribute(images(2), target=True)):
        for m in maps:
            assert not m.requires_grad and m.grad_fn is None
    result = attr.attribute_tuples(images(4))
    for t in (result.maps, result.scores, result.weights, result.embeddings):
        assert not t.requires_grad and t.grad_fn is None
    exp = explain(model, torch.randn(3, 3, 16, 16), labels=[0, 0, 1], method="sam")
    for t in (exp.maps, exp.raw_maps, exp.scores, exp.weights, exp.embeddings, exp.images):
        assert not t.requires_grad and t.grad_fn is None


def test_create_graph_backpropagates_into_parameters():
    model = SmallNet().eval()
    attr = EmbeddingAttribution(model, "block", method="sam")
    maps = attr.attribute(images(3), create_graph=True)
    assert all(m.requires_grad and m.grad_fn is not None for m in maps)
    assert all(p.grad is None for p in model.parameters())  # the call itself filled nothing
    sum(m.sum() for m in maps).backward()
    for module in (model.stem[0], model.body[0][0], model.block[0], model.head[0]):
        assert module.weight.grad is not None, module
        assert module.weight.grad.abs().sum() > 0, module


def _live_tensors() -> int:
    gc.collect()
    count = 0
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor):  # type(): no __class__ property lookups
            count += 1
    return count


def test_no_memory_growth_over_200_calls():
    model, _ = prepared(SmallNet())
    attr = EmbeddingAttribution(model, "block", method="sam")
    x, x_pair = images(3, size=16), images(2, size=16)
    target = torch.tensor([True, False])

    def call(i):
        if i % 2:
            return attr.attribute(x)
        return attr.attribute(x_pair, target=target)

    for i in range(5):
        call(i)
    before = _live_tensors()
    for i in range(200):
        out = call(i)
    del out
    after = _live_tensors()
    assert after - before <= 0, f"{after - before} tensors leaked over 200 calls"
    # with no_grad and after exceptions too
    with torch.no_grad():
        for i in range(20):
            call(i)
    for _ in range(20):
        with pytest.raises(InputError):
            attr.attribute(x_pair)  # no target
    assert _live_tensors() - before <= 0


def test_model_is_garbage_collected_after_use():
    model = SmallNet()
    EmbeddingAttribution(model, "block", method="sam").attribute(images(3))
    EmbeddingAttribution(model, method="sam").attribute(images(3))
    explain(model, torch.randn(3, 3, 16, 16), labels=[0, 0, 1])
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None, "something (a cache or a hook) keeps the model alive"


class _Counter:
    def __init__(self):
        self.saved = 0

    @contextmanager
    def counting(self):
        def pack(t):
            self.saved += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield self


def _saved_during(fn) -> int:
    counter = _Counter()
    with counter.counting():
        fn()
    return counter.saved


@pytest.mark.parametrize("chunk_size", [None, 1])
def test_trunk_before_the_layer_builds_no_graph(chunk_size):
    x = images(3)
    counts, full = {}, {}
    for depth in (1, 6):
        torch.manual_seed(0)
        model = SmallNet(depth=depth).eval()
        attr = EmbeddingAttribution(model, "block", method="sam")
        attr.attribute(x)  # warm-up: the layer is found (with a graph) once and cached
        counts[depth] = _saved_during(lambda: attr.attribute(x, chunk_size=chunk_size))
        full[depth] = _saved_during(lambda: model(torch.cat(x)))
        head = _saved_during(lambda: model.head(torch.randn(6, 16, 8, 8, requires_grad=True)))
        assert head > 0
        # the head (after the layer) and the few score ops save tensors, once per chunk;
        # the trunk none
        chunks = 1 if chunk_size is None else 2
        assert counts[depth] / chunks < full[depth]
    # five more conv blocks before the layer add nothing: the trunk saves no tensors
    assert counts[1] == counts[6], counts
    assert full[6] > full[1]  # while a plain forward in grad mode does save them


def test_create_graph_keeps_the_trunk_graph():
    """The saved-tensor count above does see the trunk when a graph is asked for."""
    x = images(3)
    counts = {}
    for depth in (1, 6):
        torch.manual_seed(0)
        model = SmallNet(depth=depth).eval()
        attr = EmbeddingAttribution(model, "block", method="sam")
        attr.attribute(x)
        counts[depth] = _saved_during(lambda: attr.attribute(x, create_graph=True))
    assert counts[6] > counts[1]
