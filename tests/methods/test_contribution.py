"""The contribution reading (the default) against the sensitivity reading: exact values on
global-average-pooled toy models, and the promises for similar pairs.

* closed form: the gradient of image ``i``'s score is its partners' direction itself,
  ``sum_j c_ij z_j / (|f_i| |f_hat_i - m|)``;
* on a global-average-pooled linear head, its maps without ReLU are Stylianou's exact
  decomposition less one constant per image (the head's bias and the centre), with or
  without a reference, and Stylianou's maps sum to the (centred) cosine targets;
* an identical pair gets non-zero maps (the sensitivity reading's are zero), and an image
  and its mirror image get mirrored maps under a mirror-equivariant network (property
  test over random images).
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from networks import gap_model
from simexplain import explain
from simexplain.methods import (
    DEFAULT_METHOD,
    Contribution,
    GradCAMCosine,
    PartnerSAM,
    Stylianou,
    reference_centre,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def images(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def biased(model):
    if len(model) > 3:
        with torch.no_grad():
            model[3].bias.copy_(torch.linspace(-0.5, 0.5, model[3].bias.numel()))
    return model


def test_the_default_is_the_contribution_reading():
    assert DEFAULT_METHOD == "contribution"
    assert Contribution.rotation_invariant and issubclass(PartnerSAM, Contribution)


@pytest.mark.parametrize("head", [False, True])
@pytest.mark.parametrize("centred", [False, True])
def test_gradient_is_the_partners_direction(head, centred):
    model = biased(gap_model(head))
    x1, x2 = images(2, 3, 3, 4, 5)
    reference = images(6, 3, 4, 5, seed=1) if centred else None
    maps = Contribution(model, layer="0", reference=reference).explain((x1, x2), relu=False)
    a1, f1, f2 = model[0](x1), model(x1), model(x2)
    m = reference_centre(model, reference).double() if centred else torch.zeros(f1.shape[1])
    u1, u2 = F.normalize(f1, dim=-1), F.normalize(f2, dim=-1)
    z2 = F.normalize(u2 - m, dim=-1)
    grad_f = z2 / (f1.norm(dim=1, keepdim=True) * (u1 - m).norm(dim=1, keepdim=True))
    alpha = (grad_f @ model[3].weight if head else grad_f) / 20
    expected = torch.einsum("nc,nchw->nhw", alpha, a1).detach()
    torch.testing.assert_close(maps[:, 0], expected)


@pytest.mark.parametrize("count", [2, 3, 4])
@pytest.mark.parametrize("centred", [False, True])
def test_on_a_pooled_linear_head_it_is_stylianous_decomposition_less_a_constant(count, centred):
    model = biased(gap_model(True))
    tuples = tuple(images(count, 3, 3, 4, 4, seed=2).unbind(0))
    reference = images(8, 3, 4, 4, seed=3) if centred else None
    gradcam = Contribution(model, layer="0", reference=reference).explain(tuples, relu=False)
    exact = Stylianou(model, layer="0", reference=reference).explain(tuples)
    offset = exact - gradcam
    torch.testing.assert_close(offset, offset[..., :1, :1].expand_as(offset))
    assert offset.abs().max() > 1e-6  # the bias and the centre give a constant, not zero
    # Stylianou's maps sum to each image's (centred) cosine target
    slots = torch.stack([model(x) for x in tuples]).detach()
    centre = reference_centre(model, reference).double() if centred else None
    z = F.normalize(F.normalize(slots, dim=-1) - (0 if centre is None else centre), dim=-1)
    from simexplain.methods import cosine_coefficients

    targets = torch.einsum("ij,ibd,jbd->bi", cosine_coefficients(count).double(), z, z)
    torch.testing.assert_close(exact.sum((2, 3)), targets)


def test_scores_are_the_cosine_targets_in_both_readings():
    model = gap_model(True)
    x1, x2 = images(2, 2, 3, 4, 4, seed=4)
    cos = F.cosine_similarity(model(x1), model(x2)).detach()
    for method in ("contribution", "gradcam_cosine"):
        exp = explain(model, torch.stack([x1, x2], 1), [0, 0], layer="0", method=method)
        torch.testing.assert_close(exp.scores, torch.stack([cos, cos], 1))


def test_an_identical_pair_is_explained_not_blanked():
    model = gap_model(True)
    x = images(2, 3, 4, 4, seed=5)
    contribution = Contribution(model, layer="0").explain((x, x))
    assert (contribution.flatten(2).amax(-1) > 0).all()
    torch.testing.assert_close(contribution[:, 0], contribution[:, 1])
    sensitivity = GradCAMCosine(model, layer="0").explain((x, x))
    assert sensitivity.abs().max() < 1e-12  # what would make it more similar: nothing


def mirror_equivariant_net() -> nn.Sequential:
    """1x1 convolutions and global average pooling: mirroring the image mirrors the layer
    and leaves the embedding as it is."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(), nn.Conv2d(6, 8, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).double().eval()


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), centred=st.booleans())
def test_an_image_and_its_mirror_image_get_mirrored_maps(seed, centred):
    net = mirror_equivariant_net()
    x = images(1, 3, 6, 6, seed=seed)
    reference = images(6, 3, 6, 6, seed=seed + 1) if centred else None
    method = Contribution(net, layer="3", reference=reference)
    maps = method.explain((x, x.flip(-1)), relu=False)
    torch.testing.assert_close(maps[:, 1], maps[:, 0].flip(-1))
    assert maps.abs().max() > 0
    relu = method.explain((x, x.flip(-1)))
    torch.testing.assert_close(relu[:, 1], relu[:, 0].flip(-1))
