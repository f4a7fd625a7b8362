"""EmbeddingAttribution inside captum's own tools: NoiseTunnel, metrics, interpolate, figures."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from captum.attr import LayerAttribution, NoiseTunnel  # noqa: E402
from captum.attr import visualization as captum_viz  # noqa: E402
from captum.metrics import infidelity, infidelity_perturb_func_decorator  # noqa: E402
from captum.metrics import sensitivity_max  # noqa: E402
from matplotlib import colormaps  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from networks import resnet18
from simexplain import EmbeddingAttribution, InputError, upsample_maps  # noqa: E402
from simexplain.methods import DEFAULT_METHOD  # noqa: E402
from simexplain.attribution import TupleScore, maps_to_input_shape, to_image_attr, visualize_map

from model_state import unchanged  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

MIXED = torch.tensor([True, False, True])  # per-pair targets: a wrong expansion shows


def tiny_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 6),
    )


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return tiny_cnn().eval()


@pytest.fixture(scope="module")
def resnet():
    return resnet18()


def images(count, batch, size=32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, 3, size, size, generator=generator) for _ in range(count))


def manual_noise_tunnel(attr, slots, target, nt_type, samples, batch_size, stdev, seed):
    """NoiseTunnel by hand: the same noise draws, attribute() per noisy copy, then the moments."""
    torch.manual_seed(seed)
    batch_size = samples if batch_size is None else batch_size
    sizes = [batch_size] * (samples // batch_size) + [samples % batch_size]
    per_sample = [[] for _ in slots]  # per slot: (B, k, 1, h, w) blocks of noisy maps
    for k in (s for s in sizes if s):
        noisy = tuple(
            x.repeat_interleave(k, 0)
            + torch.normal(0, torch.full((len(x) * k, *x.shape[1:]), stdev))
            for x in slots
        )
        expanded = None if target is None else target.repeat_interleave(k)
        for slot, m in enumerate(attr.attribute(noisy, expanded)):
            per_sample[slot].append(m.reshape(slots[0].shape[0], k, *m.shape[1:]))
    out = []
    for blocks in per_sample:
        maps = torch.cat(blocks, dim=1)
        mean, mean_sq = maps.mean(1), maps.pow(2).mean(1)
        moments = {"smoothgrad": mean, "smoothgrad_sq": mean_sq, "vargrad": mean_sq - mean**2}
        out.append(moments[nt_type])
    return out


# --------------------------------------------------------------------------- NoiseTunnel


@pytest.mark.parametrize("batch_size", [None, 2])
@pytest.mark.parametrize("nt_type", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_noise_tunnel_equals_manual_average_pairs(cnn, nt_type, batch_size):
    attr = EmbeddingAttribution(cnn, "3", method="sam")
    slots = images(2, 3)
    torch.manual_seed(5)
    with unchanged(cnn):
        smoothed = NoiseTunnel(attr).attribute(
            slots, nt_type=nt_type, nt_samples=5, nt_samples_batch_size=batch_size,
            stdevs=0.3, target=MIXED,
        )  # fmt: skip
    expected = manual_noise_tunnel(attr, slots, MIXED, nt_type, 5, batch_size, 0.3, seed=5)
    assert len(smoothed) == 2
    for got, exp in zip(smoothed, expected):
        assert got.shape == (3, 1, 16, 16)
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-6 * float(exp.abs().max()))
    plain = attr.attribute(slots, MIXED)
    assert not torch.allclose(smoothed[0], plain[0])  # the noise did something


def test_noise_tunnel_expands_per_pair_target_per_tuple(cnn):
    """Each pair keeps its own same-class flag on all of its noisy copies."""
    attr = EmbeddingAttribution(cnn, "3", method="sam")
    slots = images(2, 3)
    tunnel = NoiseTunnel(attr)
    kwargs = dict(nt_samples=4, nt_samples_batch_size=3, stdevs=1e-6)
    mixed = tunnel.attribute(slots, target=MIXED, **kwargs)
    plain = attr.attribute(slots, MIXED)
    for got, exp in zip(mixed, plain):  # negligible noise: the maps without noise
        torch.testing.assert_close(got, exp, rtol=1e-3, atol=1e-5 * float(exp.abs().max()))
    as_list = tunnel.attribute(slots, target=MIXED.tolist(), **kwargs)
    torch.testing.assert_close(as_list[1], mixed[1], rtol=1e-3, atol=1e-6)
    for flag in (True, False):  # one bool for all pairs is broadcast, not expanded
        shared = tunnel.attribute(slots, target=flag, **kwargs)
        rows = MIXED == flag
        torch.testing.assert_close(shared[0][rows], mixed[0][rows], rtol=1e-3, atol=1e-6)
        assert not torch.allclose(shared[0][~rows], mixed[0][~rows], rtol=1e-3)


def test_noise_tunnel_single_pair_target_of_shape_1(cnn):
    attr = EmbeddingAttribution(cnn, "3", method="sam")
    slots = tuple(x[:1] for x in images(2, 3))
    torch.manual_seed(7)
    got = NoiseTunnel(attr).attribute(slots, nt_samples=3, stdevs=0.2, target=torch.tensor([False]))
    exp = manual_noise_tunnel(attr, slots, torch.tensor([False]), "smoothgrad", 3, None, 0.2, 7)
    torch.testing.assert_close(got[1], exp[1], rtol=1e-4, atol=1e-8)


def test_noise_tunnel_triplet_resnet18(resnet):
    attr = EmbeddingAttribution(resnet, "layer4", method="sam")
    slots = images(3, 2, size=64)
    torch.manual_seed(3)
    with unchanged(resnet):
        got = NoiseTunnel(attr).attribute(
            slots, nt_type="smoothgrad", nt_samples=3, nt_samples_batch_size=2, stdevs=0.1
        )
    expected = manual_noise_tunnel(attr, slots, None, "smoothgrad", 3, 2, 0.1, seed=3)
    for g, e in zip(got, expected):
        assert g.shape == (2, 1, 2, 2)
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6 * float(e.abs().max()))


# --------------------------------------------------------------------------- sensitivity_max


def test_sensitivity_max_pairs_finite_and_zero_without_perturbation(cnn):
    attr = EmbeddingAttribution(cnn, "3", method="sam")
    slots = images(2, 3)
    with unchanged(cnn):
        sens = sensitivity_max(
            attr.attribute, slots, target=MIXED, n_perturb_samples=4, max_examples_per_batch=6
        )
    assert sens.shape == (3,) and torch.isfinite(sens).all() and (sens > 0).all()

    def unchanged_inputs(inputs, radius):
        return inputs

    # Zero only if each repeated pair kept its own flag (a repeat, not repeat_interleave,
    # expansion of the target would mix the pairs' flags up).
    still = sensitivity_max(
        attr.attribute, slots, unchanged_inputs, target=MIXED, n_perturb_samples=3
    )
    torch.testing.assert_close(still, torch.zeros(3), atol=1e-5, rtol=0)


def test_sensitivity_max_triplet_resnet18(resnet):
    attr = EmbeddingAttribution(resnet, "layer4", method="sam")
    sens = sensitivity_max(attr.attribute, images(3, 2, size=128), n_perturb_samples=2)
    assert sens.shape == (2,) and torch.isfinite(sens).all()


# --------------------------------------------------------------------------- infidelity


def test_tuple_score_is_the_sum_of_explained_scores_with_w_fixed():
    torch.manual_seed(0)
    model = tiny_cnn().train()  # the score must use the attribution's eval mode
    attr = EmbeddingAttribution(model, "3", method="sam")
    slots = images(2, 3)
    result = attr.attribute_tuples(slots, MIXED)
    with unchanged(model):
        score = TupleScore(attr, slots, MIXED)
        values = score(*slots)
    torch.testing.assert_close(values, result.scores.sum(1))
    torch.testing.assert_close(score.weights, result.weights)
    # Two noisy copies per tuple, in repeat_interleave order: w stays that of the tuple.
    noisy = tuple(x.repeat_interleave(2, 0) + 0.5 * torch.randn(6, 3, 32, 32) for x in slots)
    fixed = score(*noisy)
    recomputed = attr.attribute_tuples(noisy, MIXED.repeat_interleave(2))
    per_slot = torch.stack(recomputed.embeddings.unbind(1))  # (T, 6, d)
    expected = (result.weights.repeat_interleave(2, 0) * per_slot).sum(dim=(0, 2))
    torch.testing.assert_close(fixed, expected)
    assert not torch.allclose(fixed, recomputed.scores.sum(1))  # w was not recomputed


def test_tuple_score_errors(cnn):
    attr = EmbeddingAttribution(cnn, "3", method="sam")
    slots = images(3, 2)
    score = TupleScore(attr, slots)
    with pytest.raises(InputError, match="3-image tuples"):
        score(*slots[:2])
    with pytest.raises(InputError, match="k copies"):
        score(*(x[:1] for x in slots))
    with pytest.raises(InputError, match="target"):
        TupleScore(attr, slots[:2])  # a pair needs its same-class flags


def test_infidelity_is_zero_for_unchanged_inputs_and_matches_formula(cnn):
    attr = EmbeddingAttribution(cnn, "3", method="sam")
    slots = images(2, 3)
    maps = maps_to_input_shape(attr.attribute(slots, MIXED), slots)
    score = TupleScore(attr, slots, MIXED)

    @infidelity_perturb_func_decorator(False)
    def same(inputs):
        return inputs

    zero = infidelity(score, same, slots, maps, n_perturb_samples=3)
    torch.testing.assert_close(zero, torch.zeros(3), atol=1e-10, rtol=0)

    shifts = torch.tensor([0.1, -0.2, 0.3])  # one known shift per tuple, on slot 0 only

    def shift_first(inputs):
        delta = shifts.repeat_interleave(inputs[0].shape[0] // 3)[:, None, None, None]
        perturbation = (delta.expand_as(inputs[0]), torch.zeros_like(inputs[1]))
        return perturbation, (inputs[0] - perturbation[0], inputs[1])

    got = infidelity(score, shift_first, slots, maps, n_perturb_samples=2)
    shifted = (slots[0] - shifts[:, None, None, None], slots[1])
    explained = (maps[0] * shifts[:, None, None, None]).flatten(1).sum(1)
    expected = (explained - (score(*slots) - score(*shifted))) ** 2
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-8)


def test_infidelity_triplet_resnet18(resnet):
    attr = EmbeddingAttribution(resnet, "layer4", method="sam")
    slots = images(3, 2, size=64)
    maps = maps_to_input_shape(attr.attribute(slots), slots)
    score = TupleScore(attr, slots)

    @infidelity_perturb_func_decorator(False)
    def noisy(inputs):
        return tuple(x + 0.05 * torch.randn_like(x) for x in inputs)

    with unchanged(resnet):
        value = infidelity(score, noisy, slots, maps, n_perturb_samples=2, normalize=True)
    assert value.shape == (2,) and torch.isfinite(value).all()


def test_maps_to_input_shape():
    maps = (torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4))
    inputs = (torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16))
    out = maps_to_input_shape(maps, inputs)
    assert [tuple(o.shape) for o in out] == [(2, 3, 16, 16)] * 2
    for o, m in zip(out, maps):
        for c in range(3):
            torch.testing.assert_close(o[:, c : c + 1], upsample_maps(m, (16, 16)))
    nearest = maps_to_input_shape(maps[0], inputs[0], mode="nearest")
    assert torch.equal(nearest[:, 1, ::4, ::4], maps[0][:, 0])
    with pytest.raises(InputError, match="one map batch per slot"):
        maps_to_input_shape(maps, inputs[:1])
    with pytest.raises(InputError, match="do not match"):
        maps_to_input_shape(maps[0], inputs[0][:1])


# --------------------------------------------------------------------------- interpolate


def test_layer_attribution_interpolate_gives_input_size(resnet):
    attr = EmbeddingAttribution(resnet, "layer4", method="sam")
    slots = images(3, 2, size=64)
    maps = attr.attribute(slots)
    for m in maps:
        up = LayerAttribution.interpolate(m, (64, 64), "bilinear")
        assert up.shape == (2, 1, 64, 64)
        torch.testing.assert_close(up, upsample_maps(m, (64, 64)))
        assert attr.interpolate(m, (64, 48)).shape == (2, 1, 64, 48)


# --------------------------------------------------------------------------- figures


def test_to_image_attr_layout():
    m = torch.arange(16.0).reshape(1, 1, 4, 4)
    arr = to_image_attr(m)
    assert arr.shape == (4, 4, 1) and arr.dtype == np.float32
    assert np.array_equal(arr[..., 0], m[0, 0].numpy())
    assert to_image_attr(m[0, 0], size=(32, 24)).shape == (32, 24, 1)
    with pytest.raises(InputError, match="one map"):
        to_image_attr(torch.rand(2, 1, 4, 4))


@pytest.mark.parametrize("method", ["heat_map", "blended_heat_map"])
def test_visualize_map_draws_like_captum(cnn, method):
    attr = EmbeddingAttribution(cnn, "3", method="sam")
    slots = images(2, 3)
    maps = attr.attribute(slots, MIXED)
    image = torch.rand(3, 32, 32)
    fig, axis = visualize_map(maps[0][0], image, method=method, use_pyplot=False)
    reference_fig, reference_axis = captum_viz.visualize_image_attr(
        to_image_attr(maps[0][0], (32, 32)), image.permute(1, 2, 0).numpy(), method, "positive",
        use_pyplot=False,
    )  # fmt: skip
    got, exp = axis.images[-1], reference_axis.images[-1]
    np.testing.assert_array_equal(got.to_rgba(got.get_array()), exp.to_rgba(exp.get_array()))
    fig.canvas.draw()


@pytest.mark.parametrize(
    "method", ["heat_map", "blended_heat_map", "original_image", "masked_image", "alpha_scaling"]
)
def test_visualize_map_all_zero_map(method):
    zero = torch.zeros(1, 1, 4, 4)
    with pytest.raises(AssertionError):  # why the helper exists: captum cannot scale zeros
        captum_viz.visualize_image_attr(to_image_attr(zero), method="heat_map", use_pyplot=False)
    image = torch.rand(3, 32, 32)
    fig, axis = visualize_map(zero, None if method == "heat_map" else image, method=method,
                              use_pyplot=False, title="zero")  # fmt: skip
    fig.canvas.draw()
    assert axis.get_title() == "zero"
    drawn = axis.images[-1]
    if method in ("heat_map", "blended_heat_map"):  # everywhere the colour of zero
        rgba = drawn.to_rgba(drawn.get_array())
        assert np.allclose(rgba[..., :3], colormaps["Greens"](0.0)[:3])
    pixels = np.asarray(drawn.get_array())
    if method == "masked_image":
        assert not pixels.any()  # nothing kept: black
    if method == "alpha_scaling":
        assert (pixels == 255).all()  # nothing kept: blank (white, opaque)
    if method == "original_image":
        assert np.array_equal(pixels, (image.permute(1, 2, 0).numpy() * 255).astype(np.uint8))


def test_visualize_map_all_zero_map_sign_all_and_cmap():
    fig, axis = visualize_map(torch.zeros(4, 4), sign="all", use_pyplot=False)
    drawn = axis.images[-1]
    assert np.allclose(drawn.to_rgba(drawn.get_array())[..., :3], 1.0)  # white, the zero
    fig, axis = visualize_map(torch.zeros(4, 4), cmap="viridis", use_pyplot=False)
    drawn = axis.images[-1]
    assert np.allclose(drawn.to_rgba(drawn.get_array()), colormaps["viridis"](0.0))


class Shifted(nn.Module):
    """A model with an extra forward argument: a shift of every embedding."""

    def __init__(self, shift_required):
        super().__init__()
        self.body = tiny_cnn().eval()
        self.shift_required = shift_required

    def forward(self, x, shift=None):
        if shift is None and self.shift_required:
            raise TypeError("forward() missing 1 required positional argument: 'shift'")
        return self.body(x) + (0 if shift is None else shift)


def test_tuple_score_passes_additional_forward_args():
    attr = EmbeddingAttribution(Shifted(shift_required=False), "body.3", method="sam")
    slots = images(3, 2)
    shift = torch.linspace(-1, 1, 6)  # a shift of the embedding changes w and the scores
    result = attr.attribute_tuples(slots, additional_forward_args=(shift,))
    score = TupleScore(attr, slots, additional_forward_args=shift)
    torch.testing.assert_close(score(*slots), result.scores.sum(1))
    assert not torch.allclose(score(*slots), TupleScore(attr, slots)(*slots))


def test_noise_tunnel_model_with_required_forward_arg():
    attr = EmbeddingAttribution(Shifted(shift_required=True), "body.3", method="sam")
    slots = images(3, 2)
    shift = torch.tensor(0.5)  # 0-dim: captum passes it on unexpanded
    maps = NoiseTunnel(attr).attribute(
        slots, nt_samples=2, stdevs=0.1, additional_forward_args=(shift,)
    )
    assert maps[0].shape == (2, 1, 16, 16)


def test_per_tuple_forward_args_through_noise_tunnel():
    attr = EmbeddingAttribution(Shifted(shift_required=False), "body.3", method="sam")
    slots = images(2, 3)
    shift = torch.tensor([[0.5], [-0.5], [1.0]])  # (B, 1): one shift per pair
    expected = [
        attr.attribute(tuple(x[b : b + 1] for x in slots), MIXED[b], (shift[b, 0],))
        for b in range(3)
    ]
    got = NoiseTunnel(attr).attribute(
        slots, nt_samples=2, stdevs=1e-6, target=MIXED, additional_forward_args=(shift,)
    )
    for slot in range(2):
        exp = torch.cat([e[slot] for e in expected])
        torch.testing.assert_close(got[slot], exp, rtol=1e-3, atol=1e-5 * float(exp.abs().max()))


# --------------------------------------------------------------------------- the default method


@pytest.fixture(scope="module")
def default_attr(cnn):
    """The default method with a reference, so that its centring is exercised."""
    reference = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    attr = EmbeddingAttribution(cnn, "3", reference=reference)
    assert attr.method.name == DEFAULT_METHOD and attr.method.centre is not None
    return attr


def test_noise_tunnel_with_the_default_method(cnn, default_attr):
    slots = images(3, 3)
    torch.manual_seed(5)
    with unchanged(cnn):
        smoothed = NoiseTunnel(default_attr).attribute(slots, nt_samples=4, stdevs=0.3)
    expected = manual_noise_tunnel(default_attr, slots, None, "smoothgrad", 4, None, 0.3, 5)
    for got, exp in zip(smoothed, expected):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-6 * float(exp.abs().max()))


def test_tuple_score_of_the_default_method_holds_partners_fixed(default_attr):
    slots = images(3, 3)
    result = default_attr.attribute_tuples(slots)
    score = TupleScore(default_attr, slots)
    torch.testing.assert_close(score(*slots), result.scores.sum(1))
    # Perturbing only the anchor moves only the anchor's term: the partners stay fixed.
    moved = (slots[0] + 0.5, *slots[1:])
    recomputed = default_attr.attribute_tuples(moved).scores
    assert not torch.allclose(score(*moved), recomputed.sum(1))
    fixed_partner_terms = result.scores[:, 1:].sum(1)
    centre = default_attr.method.centre
    with torch.no_grad():
        z = [F.normalize(F.normalize(default_attr.forward_func(x), dim=-1) - centre, dim=-1)
             for x in (moved[0], *slots[1:])]
    anchor = (z[0] * (z[1] - z[2])).sum(-1)
    torch.testing.assert_close(score(*moved), anchor + fixed_partner_terms)


def test_sensitivity_and_infidelity_with_the_default_method(cnn, default_attr):
    slots = images(3, 3)
    with unchanged(cnn):
        sens = sensitivity_max(default_attr.attribute, slots, n_perturb_samples=2)
        maps = maps_to_input_shape(default_attr.attribute(slots), slots)
        score = TupleScore(default_attr, slots)

        @infidelity_perturb_func_decorator(False)
        def same(inputs):
            return inputs

        zero = infidelity(score, same, slots, maps, n_perturb_samples=2)
    assert sens.shape == (3,) and torch.isfinite(sens).all()
    torch.testing.assert_close(zero, torch.zeros(3), atol=1e-10, rtol=0)
