"""Bad input: the exact exception type, a message saying what is wrong and what to do,
and the model left exactly as it was."""

from __future__ import annotations

import math
import re
from contextlib import contextmanager

import pytest
import torch
import torchvision
from model_state import assert_unchanged, snapshot
from torch import nn

from simexplain import (
    EmbeddingAttribution,
    InputError,
    LayerError,
    ModelForwardError,
    ModelOutputError,
    SimExplainError,
    explain,
    scale_maps,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@contextmanager
def raises(model: nn.Module, error: type, match: str):
    """``pytest.raises(error, match=match)`` that also checks ``model`` is untouched."""
    before = snapshot(model)
    with pytest.raises(error, match=match) as info:
        yield info
    assert (
        type(info.value) is error
    ), f"expected exactly {error.__name__}, got {type(info.value).__name__}"
    assert isinstance(info.value, ValueError)
    assert_unchanged(model, before)


class SmallNet(nn.Module):
    """conv blocks -> ``block`` (8x8 map at 16 px) -> head: 1x1 conv, pool, flatten, linear."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
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
        self.unused = nn.Conv2d(16, 16, 1)  # a spatial layer the forward pass never calls

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


def unusual(model: nn.Module) -> nn.Module:
    """Mixed train/eval modes, a frozen parameter and a pre-filled gradient."""
    model.train()
    list(model.children())[0].eval()
    params = list(model.parameters())
    params[0].requires_grad_(False)
    params[1].grad = torch.randn_like(params[1])
    return model


@pytest.fixture
def model():
    return unusual(SmallNet())


@pytest.fixture
def attr(model):
    return EmbeddingAttribution(model, "block", method="sam")


def images(count: int, batch: int = 2, size: int = 16) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(batch, 3, size, size) for _ in range(count))


def test_errors_are_value_errors():
    for error in (InputError, LayerError, ModelOutputError):
        assert issubclass(error, SimExplainError) and issubclass(error, ValueError)


# ------------------------------------------------------------------- attribute: inputs


@pytest.mark.parametrize("count", [0, 1, 5])
def test_wrong_number_of_slots(model, attr, count):
    match = rf"inputs has {count} image batches; pass 2 \(pair\), 3 \(triplet.*4 \(quadruplet"
    with raises(model, InputError, match):
        attr.attribute(images(count))


@pytest.mark.parametrize("bad", ["tensor", "stacked", "generator"])
def test_inputs_not_a_tuple(model, attr, bad):
    value = {
        "tensor": torch.randn(2, 3, 16, 16),
        "stacked": torch.randn(3, 2, 3, 16, 16),
        "generator": (x for x in images(3)),
    }[bad]
    with raises(
        model, InputError, r"inputs must be a tuple of 2, 3 or 4 image batches.*attribute\(\(anchor"
    ):
        attr.attribute(value)


def test_slot_not_a_tensor(model, attr):
    with raises(model, InputError, r"inputs\[1\] is list; expected a tensor \(B, C, H, W\)"):
        attr.attribute((torch.randn(2, 3, 16, 16), [[0.0]], torch.randn(2, 3, 16, 16)))


def test_mismatched_batch_sizes(model, attr):
    a, p, n = images(3)
    with raises(
        model, InputError, r"inputs\[2\] has 3 images but inputs\[0\] has 2.*same number of tuples"
    ):
        attr.attribute((a, p, torch.randn(3, 3, 16, 16)))


def test_mismatched_image_sizes(model, attr):
    a, p, _ = images(3)
    match = r"inputs\[2\] has image shape \(3, 20, 20\) but inputs\[0\] has \(3, 16, 16\).*resize"
    with raises(model, InputError, match):
        attr.attribute((a, p, torch.randn(2, 3, 20, 20)))
    match = r"inputs\[1\] has image shape \(1, 16, 16\) but inputs\[0\] has \(3, 16, 16\)"
    with raises(model, InputError, match):
        attr.attribute((a, torch.randn(2, 1, 16, 16)), target=True)


def test_mismatched_dtypes(model, attr):
    a, p, n = images(3)
    with raises(
        model,
        InputError,
        r"inputs\[1\] is torch.float64.*inputs\[0\] is torch.float32.*one device and dtype",
    ):
        attr.attribute((a, p.double(), n))


@pytest.mark.parametrize("shape", [(3, 16, 16), (2, 16, 16, 3, 1), (2, 768)])
def test_not_4d(model, attr, shape):
    a, p, _ = images(3)
    match = (
        rf"inputs\[2\] has shape {re.escape(str(shape))}; each slot must be a 4-D batch "
        r"\(B, C, H, W\).*unsqueeze\(0\)"
    )
    with raises(model, InputError, match):
        attr.attribute((a, p, torch.randn(shape)))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_integer_images(model, attr, dtype):
    a, p, n = images(3)
    with raises(model, InputError, rf"inputs\[1\] has dtype {dtype}; convert images to float"):
        attr.attribute((a, p.to(dtype), n))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_integer_images_in_explain_say_to_convert_and_normalise(model, dtype):
    """Not converted silently (uint8 0-255 images gave scores of about -0.98)."""
    pixels = torch.randint(0, 256, (3, 3, 16, 16)).to(dtype)
    match = (rf"imgs has dtype {dtype}; convert images to float and normalise them as the "
             r"model expects: e\.g\. x\.float\(\) / 255 for 0-255 pixels, then subtract the "
             r"model's mean and divide by its std")
    with raises(model, InputError, match):
        explain(model, pixels)
    with raises(model, InputError, rf"imgs\[1\] has dtype {dtype}; convert images to float"):
        explain(model, [torch.rand(3, 16, 16), pixels[1], torch.rand(3, 16, 16)])


def test_empty_batch(model, attr):
    with raises(model, InputError, r"no images \(batch size 0\)"):
        attr.attribute(images(3, batch=0))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_or_inf_in_input(model, attr, value):
    a, p, n = images(3)
    p[1, 2, 3, 4] = value
    with raises(
        model, InputError, r"inputs\[1\] contains NaN or Inf values; clean the images first"
    ):
        attr.attribute((a, p, n))


# ------------------------------------------------------------------- attribute: target


def test_pair_without_target(model, attr):
    with raises(
        model, InputError, r"pairs need target: a bool tensor \(B,\).*same-class.*weight_fn="
    ):
        attr.attribute(images(2))


@pytest.mark.parametrize(
    "target", [[True, False, True], torch.ones(3, dtype=torch.bool), [[True, False, True]]]
)
def test_target_wrong_length(model, attr, target):
    with raises(model, InputError, r"target has 3 entries for 2 pairs; pass one bool per pair"):
        attr.attribute(images(2), target=target)


@pytest.mark.parametrize("target", [[2, 0], [0.5, 1.0], torch.tensor([0.0, 1.0])])
def test_target_not_boolean(model, attr, target):
    with raises(model, InputError, r"target must hold booleans \(same-class or not\)"):
        attr.attribute(images(2), target=target)


@pytest.mark.parametrize("target", ["yes", ["same", "different"], object()])
def test_target_not_convertible(model, attr, target):
    """Not an opaque torch TypeError/ValueError: an InputError saying what target must be."""
    with raises(model, InputError, r"target must hold booleans"):
        attr.attribute(images(2), target=target)


@pytest.mark.parametrize("count", [3, 4])
def test_target_for_triplet_or_quadruplet(model, attr, count):
    match = (
        rf"target is only used for pairs.*a {count}-image tuple has its roles fixed by "
        r"position, so pass target=None"
    )
    with raises(model, InputError, match):
        attr.attribute(images(count), target=torch.tensor([True, False]))


def test_weight_fn_wrong_shape(model, attr):
    match = r"weight_fn returned \(2, 3\); it must return w of shape \(2, 8\) or \(8,\)"
    with raises(model, InputError, match):
        attr.attribute(images(3), weight_fn=lambda a, p, n: a[:, :3])
    with raises(model, InputError, r"weight_fn returned float"):
        attr.attribute(images(3), weight_fn=lambda a, p, n: 1.0)


@pytest.mark.parametrize("chunk_size", [0, -1, 2.5, "4", True])
def test_chunk_size_not_a_positive_whole_number(model, attr, chunk_size):
    match = rf"chunk_size must be a positive number of tuples, got {re.escape(repr(chunk_size))}"
    with raises(model, InputError, match):
        attr.attribute(images(3), chunk_size=chunk_size)
    with raises(model, InputError, match):
        explain(model, torch.randn(3, 3, 16, 16), chunk_size=chunk_size)


# ---------------------------------------------------------------------------- explain


@pytest.mark.parametrize("count", [1, 5])
def test_explain_wrong_number_of_images(model, count):
    match = (
        rf"a tuple holds {count} image\(s\); explain takes 2 \(pair\), 3 \(triplet\) "
        r"or 4 \(quadruplet\)"
    )
    with raises(model, InputError, match):
        explain(model, torch.randn(count, 3, 16, 16))
    with raises(model, InputError, match):
        explain(model, [torch.randn(3, 16, 16) for _ in range(count)])
    with raises(model, InputError, match):
        explain(model, torch.randn(2, count, 3, 16, 16), labels=torch.zeros(2, count))


def test_explain_images_wrong_shape(model):
    with raises(
        model, InputError, r"imgs has shape \(3, 16, 16\); pass \(T, C, H, W\) for one tuple"
    ):
        explain(model, torch.randn(3, 16, 16))
    with raises(model, InputError, r"different shapes.*resize them to one size"):
        explain(model, [torch.randn(3, 16, 16), torch.randn(3, 20, 20), torch.randn(3, 16, 16)])
    with raises(model, InputError, r"imgs must be a tensor"):
        explain(model, [])


def test_explain_pair_without_labels(model):
    with raises(
        model, InputError, r"a pair needs labels, e.g. labels=\[3, 3\] for a same-class pair"
    ):
        explain(model, torch.randn(2, 3, 16, 16))


@pytest.mark.parametrize(
    "labels, batch",
    [
        ([0, 0], 1),
        ([0, 0, 1, 2], 1),
        ([[0, 0, 1], [0, 0, 1]], 1),
        ([[0, 0, 1]] * 3, 2),
        (torch.zeros(1, 1, 3), 1),
    ],
)
def test_explain_labels_wrong_shape(model, labels, batch):
    match = (
        rf"labels has shape .* but the images are {batch} tuple\(s\) of 3; "
        rf"pass labels of shape \(3,\) or \({batch}, 3\)"
    )
    with raises(model, InputError, match):
        explain(model, torch.randn(batch, 3, 3, 16, 16), labels=labels)


@pytest.mark.parametrize("labels", [["cat", "cat", "dog"], "abc", object()])
def test_explain_labels_not_convertible(model, labels):
    """Not an opaque torch TypeError/ValueError: an InputError naming ``labels``."""
    with raises(model, InputError, r"labels"):
        explain(model, torch.randn(3, 3, 16, 16), labels=labels)


def test_explain_one_label_row_applies_to_every_tuple(model):
    """The docstring allows labels ``(T,)`` for a batch; the message even suggests it."""
    try:
        exp = explain(model, torch.randn(2, 3, 3, 16, 16), labels=[0, 0, 1])
    except InputError as error:
        assert "(3,)" not in str(error).split("pass", 1)[-1], (
            f"explain rejects labels of shape (3,) for 2 tuples and tells the user to pass "
            f"shape (3,): {error}"
        )
    else:
        assert exp.labels.tolist() == [[0, 0, 1], [0, 0, 1]]


@pytest.mark.parametrize(
    "labels, match",
    [
        ([0, 1, 2], r"labels\[0, 1\] \(the positive\) is 1 but the anchor's label is 0; a triplet"),
        ([0, 0, 0], r"labels\[0, 2\] \(the negative\) equals the anchor's label 0; negatives must"),
        (
            [5, 6, 5, 7],
            r"labels\[0, 1\] \(the positive\) is 6 but the anchor's label is 5; a quadruplet",
        ),
        ([5, 5, 5, 7], r"labels\[0, 2\] \(the negative\) equals the anchor's label 5"),
        ([5, 5, 7, 5], r"labels\[0, 3\] \(the second negative\) equals the anchor's label 5"),
        (
            [[0, 0, 1, 2], [3, 3, 4, 3]],
            r"labels\[1, 3\] \(the second negative in tuple 1\) equals the anchor's label 3",
        ),
    ],
)
def test_explain_labels_inconsistent_with_kind(model, labels, match):
    labels_t = torch.as_tensor(labels)
    count = labels_t.shape[-1]
    batch = 1 if labels_t.dim() == 1 else labels_t.shape[0]
    with raises(model, InputError, match):
        explain(model, torch.randn(batch, count, 3, 16, 16), labels=labels)


# ------------------------------------------------------------------------------ layers


def test_layer_name_that_does_not_exist(model):
    match = (
        r"the model has no layer named 'blok'\. Close names: \['block'.*model\.named_modules\(\)"
    )
    with raises(model, LayerError, match):
        EmbeddingAttribution(model, "blok", method="sam")
    with raises(model, LayerError, match):
        explain(model, torch.randn(3, 3, 16, 16), layer="blok")
    with raises(model, LayerError, r"no layer named 'head\.9'.*Close names: \['head\."):
        EmbeddingAttribution(model, "head.9", method="sam")


def test_layer_name_without_close_names_lists_some(model):
    with raises(model, LayerError, r"no layer named 'zzzzzz'\. Some names: \["):
        EmbeddingAttribution(model, "zzzzzz", method="sam")


def test_module_not_part_of_the_model(model):
    other = nn.Conv2d(8, 16, 3)
    with raises(model, LayerError, r"the layer Conv2d is not a submodule of the model"):
        EmbeddingAttribution(model, other, method="sam").attribute(images(3))
    with raises(model, LayerError, r"not a submodule of the model"):
        explain(model, torch.randn(3, 3, 16, 16), layer=other)


def test_layer_of_wrong_type(model):
    with raises(
        model, LayerError, r"layer must be None, a dotted module name or an nn.Module, got int"
    ):
        EmbeddingAttribution(model, 3, method="sam").attribute(images(3))


def test_layout_not_known(model):
    with raises(
        model, LayerError, r"layout must be one of \('NCHW', 'NHWC', 'tokens'\), got 'HWC'"
    ):
        EmbeddingAttribution(model, "block", layout="HWC", method="sam").attribute(images(3))


@pytest.mark.parametrize("name, shape", [("head.4", r"\(2, 8\)"), ("head.3", r"\(2, 16\)")])
def test_layer_without_spatial_output(model, name, shape):
    match = (
        rf"layer '{name}' returned {shape} for a 16x16 input, which is not a spatial feature map"
    )
    with raises(model, LayerError, match):
        EmbeddingAttribution(model, name, method="sam").attribute(images(3))


def test_global_pool_is_not_a_spatial_layer(model):
    """A 1x1 output (global pooling) is not a map: GradCAM on it is a constant."""
    with raises(model, LayerError, r"layer 'head\.2' .*not a spatial feature map"):
        EmbeddingAttribution(model, "head.2", method="sam").attribute(images(3))


def test_resnet_global_pool_is_not_a_spatial_layer():
    resnet = unusual(torchvision.models.resnet18(num_classes=8))
    with raises(resnet, LayerError, r"layer 'avgpool' .*not a spatial feature map"):
        EmbeddingAttribution(resnet, "avgpool", method="sam").attribute(images(3, size=64))
    with raises(
        resnet,
        LayerError,
        r"layer 'fc' returned \(2, 8\) for a 64x64 input, which is not a spatial",
    ):
        EmbeddingAttribution(resnet, "fc", method="sam").attribute(images(3, size=64))


def test_layer_not_called_in_forward(model):
    match = (
        r"layer 'unused' was not called during the model's forward pass.*"
        r"choose a layer the forward pass uses"
    )
    with raises(model, LayerError, match):
        EmbeddingAttribution(model, "unused", method="sam").attribute(images(3))
    with raises(model, LayerError, match):
        explain(model, torch.randn(3, 3, 16, 16), layer=model.unused)


# ------------------------------------------------------------------------ model output


class Wrapped(nn.Module):
    """SmallNet whose output goes through ``post``."""

    def __init__(self, post):
        super().__init__()
        self.net = SmallNet()
        self.post = post

    def forward(self, x):
        feats = self.net.block(self.net.stem(x))
        return self.post(self.net.head(feats), feats)


BAD_OUTPUTS = {
    "tuple": (
        lambda emb, feats: (emb, feats),
        r"the model returned a tuple of 2: \[0\] tensor \(2, 8\), \[1\] tensor \(2, 16, 8, 8\), "
        r"not a tensor of embeddings\. Pick the embedding with output= \(e\.g\. output=0",
    ),
    "dict": (
        lambda emb, feats: {"emb": emb},
        r"the model returned a dict with 'emb' \(tensor \(2, 8\)\), not a tensor.*output='emb'",
    ),
    "spatial": (
        lambda emb, feats: feats,
        r"the model returned shape \(2, 16, 8, 8\) for 2 images; it must return one "
        r"embedding vector per image, shape \(N, d\).*AdaptiveAvgPool2d",
    ),
    "wrong batch": (
        lambda emb, feats: emb[:1],
        r"the model returned shape \(1, 8\) for 2 images; it must return one "
        r"embedding vector per image",
    ),
    "doubled batch": (
        lambda emb, feats: torch.cat([emb, emb]),
        r"the model returned shape \(4, 8\) for 2 images",
    ),
    "scalar": (lambda emb, feats: emb.sum(), r"the model returned shape \(\) for 2 images"),
    "integer": (
        lambda emb, feats: emb.argsort(dim=1),
        r"the model returned torch.int64 embeddings; expected floats",
    ),
}


@pytest.mark.parametrize("layer", [None, "net.block"])
@pytest.mark.parametrize("case", list(BAD_OUTPUTS))
def test_model_not_returning_one_vector_per_image(case, layer):
    post, match = BAD_OUTPUTS[case]
    bad = unusual(Wrapped(post))
    with raises(bad, ModelOutputError, match):
        EmbeddingAttribution(bad, layer, method="sam").attribute(images(3))


def test_model_output_checked_on_the_real_batch():
    """The layer was already found (cached) with a good model; the bad output is still caught."""
    calls = {"n": 0}

    def post(emb, feats):
        calls["n"] += 1
        return emb if calls["n"] == 1 else emb[:-1]

    bad = unusual(Wrapped(post))
    attr = EmbeddingAttribution(bad, "net.block", method="sam")
    with raises(bad, ModelOutputError, r"the model returned shape \(5, 8\) for 6 images"):
        attr.attribute(images(3))


def test_spatial_1x1_model_output_is_accepted():
    """(N, d, 1, 1) is one vector per image: flattened, not an error."""
    ok = Wrapped(lambda emb, feats: emb[:, :, None, None]).eval()
    maps = EmbeddingAttribution(ok, "net.block", method="sam").attribute(images(3))
    assert maps[0].shape == (2, 1, 8, 8)


def _nan_post(emb, feats):
    return emb * float("nan")


def _inf_post(emb, feats):
    return emb + torch.tensor([math.inf] + [0.0] * 7)


@pytest.mark.parametrize("layer", ["net.block", None])
@pytest.mark.parametrize("post", [_nan_post, _inf_post], ids=["nan", "inf"])
def test_nan_or_inf_embeddings(post, layer):
    bad = unusual(Wrapped(post))
    with raises(bad, ModelOutputError, r"NaN or Inf embeddings"):
        EmbeddingAttribution(bad, layer, method="sam").attribute(images(3))


def test_nan_embeddings_in_explain():
    bad = unusual(Wrapped(_nan_post))
    with raises(bad, ModelOutputError, r"NaN or Inf embeddings"):
        explain(bad, torch.randn(3, 3, 16, 16), layer="net.block")
    with raises(bad, ModelOutputError, r"NaN or Inf embeddings"):
        explain(bad, torch.randn(3, 3, 16, 16))  # automatic layer


def test_nan_from_one_image_only():
    """A model that produces NaN for one specific image (a nan weight path hit by large inputs)."""

    def post(emb, feats):
        bad_rows = feats.amax(dim=(1, 2, 3)) > 1e6
        return torch.where(bad_rows[:, None], torch.full_like(emb, math.nan), emb)

    bad = unusual(Wrapped(post))
    attr = EmbeddingAttribution(bad, "net.block", method="sam")
    a, p, n = images(3)
    n[1] *= 1e9
    with raises(bad, ModelOutputError, r"NaN or Inf embeddings"):
        attr.attribute((a, p, n))


class SqrtNet(nn.Module):
    """A valid model for images in [0, 1] (sqrt of the input): NaN only for negative input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x.sqrt())).mean(dim=(2, 3)))


def test_no_spurious_error_for_a_model_fine_on_the_given_images():
    """Finding the layer must not fail on a model that is finite on the user's images."""
    model = unusual(SqrtNet())
    x = tuple(torch.rand(2, 3, 16, 16) for _ in range(3))
    explicit = EmbeddingAttribution(model, "conv", method="sam").attribute(x)
    assert all(torch.isfinite(m).all() for m in explicit)
    before = snapshot(model)
    # no LayerError, no ModelOutputError
    automatic = EmbeddingAttribution(model, method="sam").attribute(x)
    assert_unchanged(model, before)
    for a, b in zip(automatic, explicit):
        assert torch.equal(a, b)


# --------------------------------------------------------------------- the model raises


class Picky(nn.Module):
    """Raises its own error unless the images have one channel."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x, scale=None):
        if x.shape[1] != 1:
            raise RuntimeError("Picky wants grey images")
        out = self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))
        return out if scale is None else out * scale


@pytest.mark.parametrize("layer", [None, "conv"])
def test_an_error_inside_the_model_says_what_was_passed_and_keeps_its_cause(layer):
    model = unusual(Picky())
    with raises(model, ModelForwardError,
                match=r"raised RuntimeError on what simexplain passed it \(a float32 tensor "
                      r"of shape \(\d+, 3, 16, 16\) on cpu\): Picky wants grey images") as info:
        EmbeddingAttribution(model, layer).attribute(images(3))
    assert isinstance(info.value.__cause__, RuntimeError) and isinstance(info.value, InputError)
    with raises(model, ModelForwardError, match=r"on cpu, then \(2,\) tensor\)"):
        EmbeddingAttribution(model, "conv").attribute(images(3), additional_forward_args=(
            torch.ones(2),))
    grey = tuple(torch.randn(2, 1, 16, 16) for _ in range(3))
    assert EmbeddingAttribution(model, layer).attribute(grey)[0].shape == (2, 1, 16, 16)


# --------------------------------------------------------------------- all-zero maps


class DeadNet(nn.Module):
    """The explained activations are all zero: a ReLU after a hugely negative bias."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        with torch.no_grad():
            self.conv.bias.fill_(-1e4)
        self.act = nn.ReLU()
        self.fc = nn.Linear(8, 6)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean(dim=(2, 3)))


class NegativeNet(nn.Module):
    """Activations A > 0 and f = (mean A, 1): with w = (-1, 0) every map is negative."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, stride=2, padding=1)
        self.act = nn.Softplus()

    def forward(self, x):
        a = self.act(self.conv(x)) + 1.0
        mean = a.mean(dim=(2, 3))
        return torch.cat([mean, torch.ones_like(mean)], dim=1)


def _negative_w(*embeddings):
    return torch.tensor([-1.0, 0.0])


def _assert_all_zero_and_finite(t):
    assert torch.isfinite(t).all(), "NaN or Inf in maps"
    assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("count", [2, 3, 4])
def test_all_zero_activations_give_zero_maps(count):
    model = DeadNet().eval()
    target = torch.tensor([True, False]) if count == 2 else None
    attr = EmbeddingAttribution(model, "act", method="sam")
    result = attr.attribute_tuples(images(count), target=target)
    _assert_all_zero_and_finite(result.maps)
    assert result.maps.shape == (2, count, 8, 8)
    assert torch.isfinite(result.scores).all()
    _assert_all_zero_and_finite(scale_maps(result.maps))
    labels = {2: [0, 0], 3: [0, 0, 1], 4: [0, 0, 1, 2]}[count]
    exp = explain(model, torch.randn(count, 3, 16, 16), labels=labels, layer="act")
    _assert_all_zero_and_finite(exp.raw_maps)
    _assert_all_zero_and_finite(exp.maps)
    assert exp.maps.shape == (1, count, 16, 16)


def test_relu_removing_everything_gives_zero_maps():
    torch.manual_seed(0)
    model = NegativeNet().eval()
    attr = EmbeddingAttribution(model, "act", method="sam")
    x = images(2)
    raw = attr.attribute(x, weight_fn=_negative_w, relu_attributions=False)
    assert all((m < 0).all() for m in raw)  # the evidence is negative everywhere
    maps = attr.attribute(x, weight_fn=_negative_w)
    for m in maps:
        _assert_all_zero_and_finite(m)
        _assert_all_zero_and_finite(scale_maps(m))
    exp = explain(model, torch.randn(2, 3, 16, 16), weight_fn=_negative_w, layer="act",
                  method="sam")
    assert exp.kind == "custom"
    _assert_all_zero_and_finite(exp.maps)
    # without ReLU the scaled maps are finite, in [0, 1]
    exp = explain(model, torch.randn(2, 3, 16, 16), weight_fn=_negative_w, layer="act",
                  relu=False, method="sam")
    assert torch.isfinite(exp.maps).all() and exp.maps.min() >= 0 and exp.maps.max() <= 1


def test_scale_maps_of_constant_and_zero_maps():
    zeros = torch.zeros(2, 3, 5, 5)
    _assert_all_zero_and_finite(scale_maps(zeros))
    _assert_all_zero_and_finite(scale_maps(torch.zeros(4, 1, 7, 7)))
    tiny = torch.full((1, 1, 4, 4), 1e-30)
    out = scale_maps(tiny)
    assert torch.isfinite(out).all() and out.max() <= 1
