"""The explanation-method registry: exact values on closed-form toy models, shapes, state."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import LayerGradCam
from torch import nn

from model_state import unchanged
from networks import gap_model, resnet18
from simexplain import EmbeddingAttribution
from simexplain.errors import InputError, LayerError
from simexplain.methods import (
    METHODS,
    BCEGradCAM,
    GradCAMCosine,
    PairClassifierHead,
    PointSpecific,
    SAMMethod,
    SimilarityMethod,
    Stylianou,
    cosine_coefficients,
    get_method,
    register_method,
    score_methods,
    train_pair_head,
)
from simexplain.metrics import randomization_sanity

pytestmark = pytest.mark.usefixtures("one_thread")


def images(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def closed_form_gradcam(features: torch.Tensor, grad_f: torch.Tensor, head) -> torch.Tensor:
    """GradCAM for f = W mean(A) + b: the gradient is W^T grad_f / hw at every location."""
    h, w = features.shape[-2:]
    alpha = (grad_f @ head.weight if head is not None else grad_f) / (h * w)
    return torch.relu(torch.einsum("nc,nchw->nhw", alpha, features))


def cosine_gradient(f: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """d cos(f, other) / d f with ``other`` fixed."""
    fn, on = F.normalize(f, dim=-1), F.normalize(other, dim=-1)
    cos = (fn * on).sum(1, keepdim=True)
    return (on - cos * fn) / f.norm(dim=1, keepdim=True)


def parts(model, x):
    features = model[0](x)
    return features, model(x), (model[3] if len(model) > 3 else None)


@pytest.fixture(scope="module")
def resnet():
    return resnet18(eval=False)


# --------------------------------------------------------------------------- registry


def test_registry_names_and_lookup():
    assert set(METHODS) == {"sam", "sam_rescaled", "sam_contrib", "psam", "contribution",
                            "gradcam_cosine",
                            "stylianou", "point_specific", "bce_gradcam", "sbsm", "rise"}
    assert sorted(n for n, cls in METHODS.items() if cls.blackbox) == ["rise", "sbsm"]
    assert get_method("stylianou") is Stylianou
    with pytest.raises(InputError, match="unknown explanation method 'gradcam'.*sam"):
        get_method("gradcam")


def test_score_methods_and_methods_that_need_more_than_the_model(resnet):
    assert score_methods() == ["bce_gradcam", "contribution", "gradcam_cosine", "psam", "sam",
                               "sam_contrib", "sam_rescaled"]
    assert {"bce_gradcam", "psam"}.isdisjoint(score_methods(standalone=True))
    with unchanged(resnet), pytest.raises(InputError, match="'psam' needs reference="):
        EmbeddingAttribution(resnet, "layer4", method="psam")
    with unchanged(resnet), pytest.raises(InputError, match="'bce_gradcam' needs head="):
        EmbeddingAttribution(resnet, "layer4", method="bce_gradcam")
    with pytest.raises(InputError, match="not GradCAM of a per-image score"):
        EmbeddingAttribution(resnet, "layer4", method="stylianou")


def test_register_method_rejects_clashes_and_non_methods():
    with pytest.raises(ValueError, match="already registered"):

        @register_method
        class Other(SimilarityMethod):
            name = "sam"

    with pytest.raises(TypeError):
        register_method(int)
    assert METHODS["sam"] is SAMMethod
    assert register_method(SAMMethod) is SAMMethod  # re-registering the same class is fine


def test_cosine_coefficients_match_documented_targets():
    assert cosine_coefficients(2).tolist() == [[0, 1], [1, 0]]
    quad = cosine_coefficients(4)
    assert quad[0].tolist() == [0, 2, -1, -1] and torch.equal(quad, quad.T)
    with pytest.raises(InputError):
        cosine_coefficients(5)


# --------------------------------------------------------------------------- exact values


@pytest.mark.parametrize("head", [False, True])
def test_sam_matches_closed_form_for_same_class_pairs(head):
    model = gap_model(head)
    x1, x2 = images(2, 3, 3, 4, 4)
    maps = SAMMethod(model, layer="0").explain((x1, x2), same_class=True)
    (a1, f1, lin), (_, f2, _) = parts(model, x1), parts(model, x2)
    w = 1 - (F.normalize(f1, dim=-1) - F.normalize(f2, dim=-1)).abs()
    fn = F.normalize(f1, dim=-1)
    grad_f = (w - (w * fn).sum(1, keepdim=True) * fn) / f1.norm(dim=1, keepdim=True)
    torch.testing.assert_close(maps[:, 0], closed_form_gradcam(a1, grad_f, lin).detach())
    assert maps.shape == (3, 2, 4, 4)


@pytest.mark.parametrize("head", [False, True])
def test_gradcam_cosine_matches_closed_form_pairs(head):
    model = gap_model(head)
    x1, x2 = images(2, 3, 3, 4, 4)
    maps = GradCAMCosine(model, layer="0").explain((x1, x2))
    (a1, f1, lin), (a2, f2, _) = parts(model, x1), parts(model, x2)
    expected1 = closed_form_gradcam(a1, cosine_gradient(f1, f2), lin)
    expected2 = closed_form_gradcam(a2, cosine_gradient(f2, f1), lin)
    torch.testing.assert_close(maps, torch.stack([expected1, expected2], 1).detach())
    assert maps.max() > 0


def test_gradcam_cosine_triplet_targets_by_slot():
    model = gap_model(True)
    a, p, n = images(3, 2, 3, 4, 4)
    maps = GradCAMCosine(model, layer="0").explain((a, p, n))
    (aa, fa, lin), (ap, fp, _), (an, fn, _) = (parts(model, x) for x in (a, p, n))
    anchor = closed_form_gradcam(aa, cosine_gradient(fa, fp) - cosine_gradient(fa, fn), lin)
    positive = closed_form_gradcam(ap, cosine_gradient(fp, fa), lin)
    negative = closed_form_gradcam(an, -cosine_gradient(fn, fa), lin)
    torch.testing.assert_close(maps, torch.stack([anchor, positive, negative], 1).detach())


def test_gradcam_cosine_is_sam_with_sum_of_embeddings_as_w(resnet):
    """The documented identity: for pairs, w = f1 + f2 gives the cosine targets."""
    x1, x2 = torch.randn(2, 2, 3, 64, 64)
    maps = GradCAMCosine(resnet, layer="layer4").explain((x1, x2))
    sam = EmbeddingAttribution(resnet, "layer4", method="sam").attribute_tuples(
        (x1, x2), weight_fn=lambda f1, f2: f1 + f2
    )
    torch.testing.assert_close(maps, sam.maps, rtol=1e-4, atol=1e-7)
    assert maps.shape == (2, 2, 2, 2)


def test_gradcam_cosine_matches_direct_autograd_on_resnet(resnet):
    x1, x2 = torch.randn(2, 2, 3, 64, 64)
    maps = GradCAMCosine(resnet, layer="layer4").explain((x1, x2))
    captured = []
    handle = resnet.layer4.register_forward_hook(lambda m, i, o: captured.append(o))
    was_training = resnet.training
    try:
        resnet.eval()
        f1, f2 = resnet(x1), resnet(x2)
        cos = nn.functional.cosine_similarity(f1, f2.detach()).sum()
        (grad,) = torch.autograd.grad(cos, captured[0])
    finally:
        handle.remove()
        resnet.train(was_training)
    expected = torch.relu((grad.mean((2, 3), keepdim=True) * captured[0]).sum(1))
    torch.testing.assert_close(maps[:, 0], expected.detach(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("head", [False, True])
def test_stylianou_closed_form_and_sums_to_cosine(head):
    model = gap_model(head)
    if head:
        model[3].bias.data.normal_()
    x1, x2 = images(2, 3, 3, 4, 5)
    maps = Stylianou(model, layer="0").explain((x1, x2))
    (a1, f1, lin), (_, f2, _) = parts(model, x1), parts(model, x2)
    shares = a1 if lin is None else torch.einsum("dc,nchw->ndhw", lin.weight, a1)
    if lin is not None:
        shares = shares + lin.bias[:, None, None]
    scale = (20 * f1.norm(dim=1))[:, None, None]
    expected = torch.einsum("ndhw,nd->nhw", shares, F.normalize(f2, dim=-1)) / scale
    torch.testing.assert_close(maps[:, 0], expected.detach())
    cos = nn.functional.cosine_similarity(f1, f2).detach()
    torch.testing.assert_close(maps.sum((2, 3)), torch.stack([cos, cos], 1))


def test_stylianou_triplet_maps_sum_to_slot_targets():
    model = gap_model(True)
    a, p, n = images(3, 2, 3, 4, 4)
    maps = Stylianou(model).explain((a, p, n))
    fa, fp, fn = (model(x).detach() for x in (a, p, n))
    cos = nn.functional.cosine_similarity
    expected = torch.stack([cos(fa, fp) - cos(fa, fn), cos(fp, fa), -cos(fn, fa)], 1)
    torch.testing.assert_close(maps.sum((2, 3)), expected)


@pytest.mark.parametrize("replace_fc", [False, True])
def test_stylianou_on_resnet18_sums_to_cosine(resnet, replace_fc):
    model = resnet
    if replace_fc:
        model = torchvision.models.resnet18(num_classes=16)
        model.fc = nn.Identity()
    model.train()
    x1, x2 = torch.randn(2, 2, 3, 64, 64)
    with unchanged(model):
        maps = Stylianou(model).explain((x1, x2))
    model.eval()
    cos = nn.functional.cosine_similarity(model(x1), model(x2)).detach()
    torch.testing.assert_close(maps.sum((2, 3)), torch.stack([cos, cos], 1), rtol=1e-4, atol=1e-5)
    assert maps.shape == (2, 2, 2, 2)


def test_stylianou_rejects_models_without_linear_pooled_embedding():
    model = nn.Sequential(gap_model(True), nn.Tanh())
    x1, x2 = images(2, 2, 3, 4, 4)
    with unchanged(model), pytest.raises(LayerError, match="linear function of the global"):
        Stylianou(model, layer="0.0").explain((x1, x2))
    with pytest.raises(LayerError, match="head="):
        Stylianou(gap_model(True), layer="0", head=None).explain((x1, x2))
    with pytest.raises(InputError, match="head must be"):
        Stylianou(gap_model(True), head=nn.Conv2d(1, 1, 1))


def test_stylianou_explicit_head_by_name():
    model = gap_model(True)
    x1, x2 = images(2, 2, 3, 4, 4)
    maps = Stylianou(model, layer="0", head="3").explain((x1, x2))
    torch.testing.assert_close(maps, Stylianou(model, layer="0").explain((x1, x2)))


def test_point_specific_intensity_and_point_maps():
    model = gap_model(True)
    x1, x2 = images(2, 2, 3, 4, 4)
    method = PointSpecific(model, layer="0")
    intensity = method.point_to_point((x1, x2))
    (a1, f1, lin), (a2, f2, _) = parts(model, x1), parts(model, x2)
    e1 = torch.einsum("dc,nchw->ndhw", lin.weight, a1) + lin.bias[:, None, None]
    e2 = torch.einsum("dc,nchw->ndhw", lin.weight, a2) + lin.bias[:, None, None]
    expected = torch.einsum("ndhw,ndyx->nhwyx", e1, e2) / (
        256 * f1.norm(dim=1) * f2.norm(dim=1)
    ).reshape(-1, 1, 1, 1, 1)
    torch.testing.assert_close(intensity, expected.detach())
    cos = nn.functional.cosine_similarity(f1, f2).detach()
    torch.testing.assert_close(intensity.sum((1, 2, 3, 4)), cos)
    maps = method.explain((x1, x2), point=(2, 1))
    torch.testing.assert_close(maps[:, 1], intensity[:, 2, 1])
    assert maps[:, 0, 2, 1].tolist() == pytest.approx(maps[:, 1].sum((1, 2)).tolist())
    assert maps[:, 0].count_nonzero() == 2
    overall = method.explain((x1, x2))
    torch.testing.assert_close(overall[:, 0], intensity.sum((3, 4)))
    torch.testing.assert_close(overall, Stylianou(model, layer="0").explain((x1, x2)))


def test_point_specific_maps_pixels_to_grid_on_resnet(resnet):
    x1, x2 = torch.randn(2, 2, 3, 64, 64)
    method = PointSpecific(resnet, layer="layer4")
    intensity = method.point_to_point((x1, x2))  # 2x2 grid, 32 px cells
    maps = method.explain((x1, x2), point=torch.tensor([[40, 10], [5, 63]]))
    torch.testing.assert_close(maps[0, 1], intensity[0, 1, 0])
    torch.testing.assert_close(maps[1, 1], intensity[1, 0, 1])
    with pytest.raises(InputError, match="outside the 64x64 image"):
        method.explain((x1, x2), point=(64, 0))
    with pytest.raises(InputError, match="explains a pair"):
        method.explain((x1, x2, x2), point=(1, 1))


# --------------------------------------------------------------------------- BCE baseline


def separable_pairs(n=24):
    """Class 0 images are bright in channel 0, class 1 in channel 1."""
    labels = torch.randint(0, 2, (2, n))
    x = torch.randn(2, n, 3, 6, 6, dtype=torch.float64) * 0.3
    x[:, :, 0] += (labels == 0).double()[..., None, None] * 2
    x[:, :, 1] += (labels == 1).double()[..., None, None] * 2
    return x[0], x[1], labels[0] == labels[1]


def test_train_pair_head_learns_and_gradcam_matches_captum():
    model = gap_model(True, channels=6, dim=6)
    x1, x2, same = separable_pairs()
    head = train_pair_head(model, (x1, x2, same), epochs=1, batch_size=8)
    assert head.classifier.weight.dtype == torch.float64
    with unchanged(model):
        head = train_pair_head(model, (x1, x2, same), epochs=30, head=head, lr=0.05, batch_size=24)
    with torch.no_grad():
        accuracy = ((head(model(x1), model(x2)) > 0) == same).double().mean()
    assert accuracy >= 0.9 and not head.training

    model.train()
    with unchanged(model), unchanged(head):
        maps = BCEGradCAM(model, head, layer="0").explain((x1, x2))
    model.eval()
    fixed = model(x2).detach()

    class Composite(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return head(self.model(x), fixed).unsqueeze(1)

    composite = Composite()
    captum_maps = LayerGradCam(composite, composite.model[0]).attribute(
        x1, target=0, relu_attributions=True
    )
    torch.testing.assert_close(maps[:, 0], captum_maps.squeeze(1).detach())
    assert maps.shape == (24, 2, 6, 6)


def test_bce_gradcam_negates_for_different_pairs_and_rejects_triplets():
    model = gap_model(True)
    head = PairClassifierHead(4).double().eval()
    x1, x2 = images(2, 2, 3, 4, 4)
    method = BCEGradCAM(model, head, layer="0")
    plain = method.explain((x1, x2))
    flipped = method.explain((x1, x2), same_class=torch.tensor([True, False]))
    torch.testing.assert_close(flipped[0], plain[0])
    assert not torch.allclose(flipped[1], plain[1])
    with unchanged(model), pytest.raises(InputError, match="tuples of 2 images"):
        method.explain((x1, x2, x1))
    with pytest.raises(InputError, match="trained PairClassifierHead"):
        BCEGradCAM(model, None)


# --------------------------------------------------------------------------- every method


def build(name, model, layer):
    if name == "bce_gradcam":
        return get_method(name)(model, PairClassifierHead(16).eval(), layer=layer)
    if name == "psam":
        return get_method(name)(model, layer=layer, reference=torch.randn(8, 16))
    return get_method(name)(model, layer=layer)


@pytest.mark.parametrize("name", sorted(n for n, cls in METHODS.items() if not cls.blackbox))
def test_every_method_on_resnet_keeps_state_and_serves_as_explain_fn(resnet, name):
    """(The black-box methods: tests/methods/blackbox/.)"""
    x1, x2, x3 = torch.randn(3, 2, 3, 64, 64)
    method = build(name, resnet, resnet.layer4)  # a module spec, rebuilt by name for copies
    options = {"same_class": torch.tensor([True, False])} if name.startswith("sam") else {}
    resnet.train()
    with unchanged(resnet), torch.no_grad():
        pair_maps = method.explain((x1, x2), **options)
    assert pair_maps.shape == (2, 2, 2, 2)
    if 3 in method.tuple_sizes:
        assert method.explain((x1, x2, x3)).shape == (2, 3, 2, 2)
    with unchanged(resnet), pytest.raises(InputError):
        method.explain((x1,))
    result = randomization_sanity(resnet, (x1, x2), method.explain_fn(**options))
    torch.testing.assert_close(result.maps, pair_maps.float())
    assert result.randomized_maps.shape == pair_maps.shape


def test_call_adapter_uses_its_own_model_directly():
    model = gap_model(False)
    method = GradCAMCosine(model, layer="0")
    x1, x2 = images(2, 2, 3, 4, 4)
    assert method.for_model(model) is method
    torch.testing.assert_close(method(model, (x1, x2)), method.explain((x1, x2)))
    copy = gap_model(False)
    rebuilt = method.for_model(copy)
    assert isinstance(rebuilt, GradCAMCosine) and rebuilt.model is copy
