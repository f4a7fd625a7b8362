"""Exact agreement of EmbeddingAttribution with captum, pytorch-grad-cam and closed forms."""

import copy

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam
from torch import nn

from networks import resnet18
from simexplain import EmbeddingAttribution
from simexplain.engine import chunking, default_chunk_size
from simexplain.methods.criteria import triplet_weights

KINDS = {
    "same_pair": (2, True),
    "different_pair": (2, False),
    "triplet": (3, None),
    "quadruplet": (4, None),
}


def assert_maps_close(actual, expected, rtol=1e-5):
    expected = expected.detach()
    scale = expected.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(scale))


def _slots_and_target(kind, batch, size, generator):
    count, same = KINDS[kind]
    slots = tuple(torch.randn(batch, 3, size, size, generator=generator) for _ in range(count))
    target = None if same is None else torch.full((batch,), same)
    return slots, target


def _captum_maps(model, layer, slots, weights, relu):
    """captum's LayerGradCam on s_i = w . normalize(f(x_i)), with w held fixed."""

    def score(x):
        return (weights * F.normalize(model(x), dim=-1)).sum(dim=-1)

    gradcam = LayerGradCam(score, layer)
    return [gradcam.attribute(x, relu_attributions=relu) for x in slots]


@pytest.fixture(scope="module")
def resnet():
    return resnet18()


class GridView(nn.Module):
    """Wraps a token layer so the patch grid passes through an NCHW ``grid`` module."""

    def __init__(self, inner, prefix, grid_hw):
        super().__init__()
        self.inner, self.prefix, self.grid_hw = inner, prefix, grid_hw
        self.grid = nn.Identity()

    def forward(self, x):
        y = self.inner(x)
        head, patches = y[:, : self.prefix], y[:, self.prefix :]
        n, _, c = patches.shape
        spatial = self.grid(patches.transpose(1, 2).reshape(n, c, *self.grid_hw))
        return torch.cat([head, spatial.flatten(2).transpose(1, 2)], dim=1)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=0).eval()


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("kind", list(KINDS))
def test_matches_captum_layergradcam_resnet(resnet, kind, relu):
    generator = torch.Generator().manual_seed(1)
    slots, target = _slots_and_target(kind, 3, 64, generator)
    result = EmbeddingAttribution(resnet, "layer4", method="sam").attribute_tuples(
        slots, target, relu_attributions=relu
    )
    assert result.kind == kind
    expected = _captum_maps(resnet, resnet.layer4, slots, result.weights, relu)
    for k, exp in enumerate(expected):
        assert_maps_close(result.maps[:, k : k + 1], exp)


@pytest.mark.parametrize("kind", list(KINDS))
def test_matches_captum_layergradcam_vit_tokens(vit, kind):
    generator = torch.Generator().manual_seed(2)
    slots, target = _slots_and_target(kind, 2, 64, generator)
    attribution = EmbeddingAttribution(vit, method="sam")
    result = attribution.attribute_tuples(slots, target, relu_attributions=False)
    layer = attribution.feature_layer(slots[0])
    assert (layer.name, layer.layout, layer.num_prefix_tokens) == ("blocks.11.norm1", "tokens", 1)
    # The same network with the token layer's patch grid exposed as an NCHW module.
    wrapped = copy.deepcopy(vit)
    wrapped.blocks[11].norm1 = GridView(wrapped.blocks[11].norm1, 1, (4, 4))
    expected = _captum_maps(wrapped, wrapped.blocks[11].norm1.grid, slots, result.weights, False)
    for k, exp in enumerate(expected):
        assert_maps_close(result.maps[:, k : k + 1], exp)


def test_matches_pytorch_grad_cam(resnet):
    from pytorch_grad_cam import GradCAM

    class RawGradCAM(GradCAM):
        def get_cam_image(self, *args, **kwargs):
            self.raw = super().get_cam_image(*args, **kwargs)
            return self.raw

    generator = torch.Generator().manual_seed(3)
    slots, _ = _slots_and_target("triplet", 2, 64, generator)
    result = EmbeddingAttribution(resnet, resnet.layer4, method="sam").attribute_tuples(
        slots, relu_attributions=False
    )
    weights = result.weights.repeat(3, 1)  # one row per image of the slot-major batch

    class SimilarityTarget:
        def __init__(self, w):
            self.w = w

        def __call__(self, embedding):
            return (self.w * F.normalize(embedding, dim=-1)).sum()

    model = copy.deepcopy(resnet)
    cam = RawGradCAM(model=model, target_layers=[model.layer4])
    cam(input_tensor=torch.cat(slots), targets=[SimilarityTarget(w) for w in weights])
    raw = torch.from_numpy(np.asarray(cam.raw))
    ours = result.maps.transpose(0, 1).reshape(raw.shape)
    assert_maps_close(ours, raw.to(ours.dtype), rtol=1e-4)


class MeanPoolNet(nn.Module):
    """f(x) = spatial mean of x: every map has a closed form."""

    def __init__(self):
        super().__init__()
        self.features = nn.Identity()

    def forward(self, x):
        return self.features(x).mean(dim=(2, 3))


def _closed_form_map(image, weights):
    """GradCAM of s = w . f/||f|| with f = mean over pixels of the image (float64 numpy)."""
    a = image.double().numpy()
    w = weights.double().numpy()
    hw = a.shape[1] * a.shape[2]
    f = a.mean(axis=(1, 2))
    norm = np.linalg.norm(f)
    ds_df = w / norm - (w @ f) * f / norm**3
    alpha = ds_df / hw  # the gradient is the same at every pixel
    return np.maximum(np.tensordot(alpha, a, axes=1), 0)


def test_closed_form_triplet():
    generator = torch.Generator().manual_seed(4)
    anchor, positive, negative = (torch.rand(1, 3, 4, 5, generator=generator) for _ in range(3))
    result = EmbeddingAttribution(MeanPoolNet(), "features", method="sam").attribute_tuples(
        (anchor, positive, negative)
    )
    slots = (anchor, positive, negative)
    f = [torch.from_numpy(x.double().mean(dim=(2, 3)).numpy()) for x in slots]
    f = [v / v.norm() for v in f]
    weights = (1 - (f[0] - f[1]).abs()) * (f[0] - f[2]).abs()
    torch.testing.assert_close(result.weights.double(), weights, rtol=1e-5, atol=1e-7)
    for k, image in enumerate((anchor, positive, negative)):
        expected = torch.from_numpy(_closed_form_map(image[0], weights[0]))
        assert_maps_close(result.maps[0, k].double(), expected)


def test_differentiating_through_weights_matches_plain_autograd(resnet):
    generator = torch.Generator().manual_seed(5)
    slots, _ = _slots_and_target("triplet", 2, 64, generator)
    attr = EmbeddingAttribution(resnet, "layer4", method="sam")
    result = attr.attribute_tuples(slots, detach_weights=False)
    captured = []
    handle = resnet.layer4.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        embeddings = F.normalize(resnet(torch.cat(slots)), dim=-1).chunk(3)
    finally:
        handle.remove()
    (activation,) = captured
    weights = triplet_weights(*embeddings)
    for k in range(3):
        score = (weights * embeddings[k]).sum()
        (grad,) = torch.autograd.grad(score, activation, retain_graph=True)
        rows = slice(2 * k, 2 * k + 2)
        alpha = grad[rows].mean(dim=(2, 3), keepdim=True)
        expected = torch.relu((alpha * activation[rows]).sum(dim=1)).detach()
        assert_maps_close(result.maps[:, k], expected)
    detached = EmbeddingAttribution(resnet, "layer4", method="sam").attribute_tuples(slots)
    assert not torch.allclose(detached.maps, result.maps)


def test_scores_are_w_dot_f(resnet):
    slots, target = _slots_and_target("same_pair", 2, 128, torch.Generator().manual_seed(6))
    result = EmbeddingAttribution(resnet, "layer4", method="sam").attribute_tuples(slots, target)
    expected = (result.weights.unsqueeze(1) * result.embeddings).sum(-1)
    torch.testing.assert_close(result.scores, expected)
    torch.testing.assert_close(result.embeddings.norm(dim=-1), torch.ones(2, 2))


def test_mixed_pairs_use_each_pairs_weights(resnet):
    slots, _ = _slots_and_target("same_pair", 4, 128, torch.Generator().manual_seed(7))
    flags = torch.tensor([True, False, True, False])
    attribution = EmbeddingAttribution(resnet, "layer4", method="sam")
    mixed = attribution.attribute_tuples(slots, flags)
    same = attribution.attribute_tuples(slots, True)
    different = attribution.attribute_tuples(slots, False)
    assert mixed.kind == "pair"
    torch.testing.assert_close(mixed.maps[flags], same.maps[flags])
    torch.testing.assert_close(mixed.maps[~flags], different.maps[~flags])


def test_chunking_does_not_change_maps(resnet):
    slots, _ = _slots_and_target("quadruplet", 5, 128, torch.Generator().manual_seed(8))
    attribution = EmbeddingAttribution(resnet, "layer4", method="sam")
    whole = attribution.attribute(slots, chunk_size=5)
    chunked = attribution.attribute(slots, chunk_size=2)
    for a, b in zip(whole, chunked):
        assert_maps_close(b, a)


def test_custom_weight_fn(resnet):
    slots, _ = _slots_and_target("triplet", 2, 128, torch.Generator().manual_seed(9))
    attribution = EmbeddingAttribution(resnet, "layer4", method="sam")
    custom = attribution.attribute_tuples(slots, weight_fn=triplet_weights)
    builtin = attribution.attribute_tuples(slots)
    assert custom.kind == "custom"
    torch.testing.assert_close(custom.maps, builtin.maps)
    ones = attribution.attribute_tuples(slots[:2], weight_fn=lambda f1, f2: torch.ones(f1.shape[1]))
    torch.testing.assert_close(ones.weights, torch.ones_like(ones.weights))


def test_create_graph_gives_differentiable_maps_with_the_same_values(resnet):
    slots, _ = _slots_and_target("triplet", 2, 128, torch.Generator().manual_seed(10))
    attribution = EmbeddingAttribution(resnet, "layer4", method="sam")
    plain = attribution.attribute(slots)
    graph = attribution.attribute(slots, create_graph=True)
    for a, b in zip(plain, graph):
        assert a.grad_fn is None and b.grad_fn is not None
        assert_maps_close(b.detach(), a)
    sum(m.sum() for m in graph).backward()
    grads = [p.grad for p in resnet.layer3.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    resnet.zero_grad(set_to_none=True)


def test_hooking_inside_a_block_with_inplace_ops(resnet):
    # bn2's output is modified in place by `out += identity` and ReLU(inplace=True).
    slots, _ = _slots_and_target("triplet", 1, 64, torch.Generator().manual_seed(11))
    result = EmbeddingAttribution(resnet, "layer4.1.bn2", method="sam").attribute_tuples(slots)
    expected = _captum_maps(resnet, resnet.layer4[1].bn2, slots, result.weights, True)
    for k, exp in enumerate(expected):
        assert_maps_close(result.maps[:, k : k + 1], exp)


def test_all_finite_fast_path_is_exact():
    """The sum shortcut must not call huge finite inputs infinite, nor miss NaN or Inf."""
    from simexplain.engine.inputs import all_finite

    huge = torch.full((8,), 3e38)  # the sum overflows; the exact check clears it
    assert all_finite(huge)
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.randn(2, 3, 4, 4)
        x[1, 2, 3, 0] = bad
        assert not all_finite(x)
        assert not all_finite(x.transpose(0, 1))  # non-contiguous views too
    both = torch.tensor([float("inf"), float("-inf")])  # sums to NaN
    assert not all_finite(both)


def _slots(batch: int, size: int, count: int = 3, device: str = "cpu") -> list:
    image = torch.empty(1, 3, size, size, device=device)
    return [image.expand(batch, -1, -1, -1)] * count


@pytest.mark.parametrize(
    "batch, size, count, device, retained, expected",
    [
        (8, 224, 3, "cpu", False, 2),  # two 224 px triplets per pass: six images
        (5, 224, 3, "cpu", False, 2),  # 2 + 2 + 1
        (1, 1024, 2, "cpu", False, 1),  # at least one tuple
        (32, 64, 3, "cpu", False, 16),  # at most 24 of 64 px, spread: 16 + 16, not 24 + 8
        (100, 32, 2, "cpu", False, 25),  # capped at 32, spread over 4 passes
        (8, 224, 3, "cpu", True, 8),  # memory kept: 24 images of 224 px in one pass
        (32, 224, 3, "cpu", True, 8),  # four passes of eight triplets
        (9, 224, 3, "cpu", True, 5),  # 5 + 4, not 8 + 1
        (3, 1024, 2, "cpu", True, 1),
        (100, 32, 2, "cpu", True, 25),  # the same cap
        (8, 224, 3, "meta", False, 8),  # off the CPU: up to 32 per pass
        (100, 224, 4, "meta", True, 25),
    ],
)
def test_default_chunk_size(batch, size, count, device, retained, expected):
    slots = _slots(batch, size, count, device)
    assert default_chunk_size(slots, batch, retained=retained) == expected


@pytest.mark.parametrize("retained, sizes", [(False, [6, 6, 3]), (True, [15])])
def test_default_chunks_are_the_forward_passes(monkeypatch, retained, sizes):
    monkeypatch.setattr(chunking, "freed_memory_is_retained", lambda: retained)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 8, stride=8), nn.ReLU(), nn.Conv2d(4, 4, 2, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    attribution = EmbeddingAttribution(model, "2", method="sam")
    slots = tuple(torch.rand(5, 3, 224, 224) for _ in range(3))
    attribution.attribute(slots[:1] * 3)  # finds the layer (a probe pass) before counting
    seen = []
    handle = model.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    try:
        maps = attribution.attribute(slots)
    finally:
        handle.remove()
    assert seen == sizes  # chunks of 2, 2 and 1 triplets, or all five at once
    whole = attribution.attribute(slots, chunk_size=5)
    for a, b in zip(maps, whole):
        assert_maps_close(a, b)
