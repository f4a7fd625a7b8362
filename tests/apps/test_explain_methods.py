"""explain() runs every registered gradient method, decompositions included, with its own
options (the black-box methods: tests/methods/blackbox/test_blackbox_explain.py)."""

import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from networks import gap_model
from simexplain import EmbeddingAttribution, InputError, explain
from simexplain.engine import image_maps
from simexplain.methods import METHODS, PairClassifierHead, cosine_coefficients, get_method

LABELS = {2: ([3, 3], [3, 5]), 3: ([0, 0, 1],), 4: ([0, 0, 1, 2],)}
SIZE = 8  # the 1x1 conv keeps the grid: 8x8


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return gap_model(head=True).eval()


@pytest.fixture(scope="module")
def head():
    torch.manual_seed(1)
    return PairClassifierHead(4).double().eval()


def method_options(name, head):
    """What each method needs beyond the model: bce_gradcam's trained pair classifier,
    psam's reference."""
    if name == "psam":
        return {"reference": torch.randn(6, 4, generator=torch.Generator().manual_seed(8))}
    return {"head": head} if name == "bce_gradcam" else {}


CASES = [
    pytest.param(name, labels, id=f"{name}-{labels}")
    for name in sorted(METHODS) if not METHODS[name].blackbox
    for count in METHODS[name].tuple_sizes
    for labels in LABELS[count]
]


def cosine_targets(model, imgs, same=True):
    """``sum_j c_ij cos(f_i, f_j)`` of each image of one tuple, ``(T,)``."""
    with torch.no_grad():
        unit = F.normalize(model(imgs.double()), dim=-1)
    coefficients = cosine_coefficients(len(imgs)).double()
    return (coefficients * (unit @ unit.T)).sum(dim=1) * (1.0 if same else -1.0)


@pytest.mark.parametrize("name, labels", CASES)
def test_every_method_runs_through_explain(model, head, name, labels):
    count = len(labels)
    imgs = torch.randn(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(count))
    exp = explain(model, imgs, labels, layer="0", method=name, **method_options(name, head))
    same = labels[0] == labels[1] if count == 2 else None
    kinds = {True: "same_pair", False: "different_pair"}
    assert exp.method == name
    assert exp.kind == (kinds[same] if count == 2 else ("triplet", "quadruplet")[count - 3])
    assert exp.layer == "0" and exp.raw_maps.shape == (1, count, SIZE, SIZE)
    torch.testing.assert_close(exp.maps, image_maps(exp.raw_maps, (SIZE, SIZE)), rtol=0, atol=0)
    assert float(exp.maps.min()) >= 0 and float(exp.maps.max()) <= 1
    with torch.no_grad():
        expected = F.normalize(model(imgs.double()), dim=-1)
    torch.testing.assert_close(exp.embeddings[0], expected)
    slots = tuple(imgs[k : k + 1].double() for k in range(count))
    target = None if same is None else torch.tensor([same])
    if METHODS[name].has_score():
        # maps and scores are exactly the captum face's for the same tuple
        built = METHODS[name](model, layer="0", **method_options(name, head))
        direct = EmbeddingAttribution(model, method=built).attribute_tuples(slots, target)
        torch.testing.assert_close(exp.raw_maps, direct.maps, rtol=0, atol=0)
        torch.testing.assert_close(exp.scores, direct.scores, rtol=0, atol=0)
        assert float(exp.raw_maps.min()) >= 0  # GradCAM's ReLU
    else:
        # the method's own maps (a different-class pair: dissimilarity, the sign changed),
        # each summing to its image's share of the cosine criterion
        own = get_method(name).build(model, "0").explain(slots)
        sign = -1.0 if same is False else 1.0
        torch.testing.assert_close(exp.raw_maps, sign * own, rtol=0, atol=0)
        torch.testing.assert_close(exp.scores, exp.raw_maps.sum(dim=(-2, -1)))
        torch.testing.assert_close(exp.scores[0], cosine_targets(model, imgs, same is not False))


def test_stylianou_scores_are_the_map_sums_and_the_cosine_targets(model):
    imgs = torch.randn(2, 4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    exp = explain(model, imgs, [0, 0, 1, 2], method="stylianou")
    assert exp.kind == "quadruplet" and exp.weights is None and exp.layer == "0"
    for b in range(2):
        targets = cosine_targets(model, imgs[b])
        torch.testing.assert_close(exp.scores[b], targets)
        torch.testing.assert_close(exp.raw_maps[b].sum(dim=(-2, -1)), targets)
    # anchor: 2 cos(a, p) - cos(a, n1) - cos(a, n2), the whole criterion
    unit = exp.embeddings[0]
    criterion = 2 * unit[0] @ unit[1] - unit[0] @ unit[2] - unit[0] @ unit[3]
    assert float(exp.scores[0, 0]) == pytest.approx(float(criterion), abs=1e-9)
    # relu= keeps the positive evidence only; the scores stay the criterion's shares
    positive = explain(model, imgs, [0, 0, 1, 2], method="stylianou", relu=True)
    torch.testing.assert_close(positive.raw_maps, exp.raw_maps.clamp_min(0), rtol=0, atol=0)
    torch.testing.assert_close(positive.scores, exp.scores, rtol=0, atol=0)


def test_decomposition_of_mixed_pairs_changes_sign_per_pair(model):
    imgs = torch.randn(2, 2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(8))
    mixed = explain(model, imgs, [[1, 1], [1, 2]], method="stylianou")
    similar = explain(model, imgs, [[1, 1], [4, 4]], method="stylianou")
    assert mixed.kind == "pair"
    torch.testing.assert_close(mixed.raw_maps[0], similar.raw_maps[0], rtol=0, atol=0)
    torch.testing.assert_close(mixed.raw_maps[1], -similar.raw_maps[1], rtol=0, atol=0)
    cos = (similar.embeddings[1, 0] * similar.embeddings[1, 1]).sum()
    torch.testing.assert_close(mixed.scores[1], -cos.expand(2))


def test_options_reach_the_method(model):
    imgs = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9))
    coefficients = torch.tensor([[0.0, 2.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    weighted = explain(model, imgs, [0, 0, 1], method="stylianou", coefficients=coefficients)
    pair = explain(model, imgs[:2], [0, 0], method="stylianou")
    torch.testing.assert_close(weighted.raw_maps[:, :2], 2 * pair.raw_maps)
    assert float(weighted.raw_maps[:, 2].abs().max()) == 0
    soft = explain(model, imgs, [0, 0, 1], method="sam_contrib", selection="soft")
    slots = tuple(imgs[k : k + 1].double() for k in range(3))
    direct = EmbeddingAttribution(model, method="sam_contrib").attribute_tuples(
        slots, selection="soft")
    torch.testing.assert_close(soft.raw_maps, direct.maps, rtol=0, atol=0)
    with pytest.raises(InputError, match="selection must be one of"):
        explain(model, imgs, [0, 0, 1], method="sam_contrib", selection="medium")
    gallery = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    centred = explain(model, imgs, [0, 0, 1], reference=gallery)
    plain = explain(model, imgs, [0, 0, 1], method="gradcam_cosine")
    assert not torch.allclose(centred.scores, plain.scores)


def test_point_specific_with_a_point(model):
    imgs = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(10))
    exp = explain(model, imgs, [0, 0], method="point_specific", point=(5, 2))
    own = get_method("point_specific").build(model).explain(
        tuple(imgs[k : k + 1].double() for k in range(2)), point=(5, 2))
    torch.testing.assert_close(exp.raw_maps, own, rtol=0, atol=0)
    first = exp.raw_maps[0, 0]
    assert torch.count_nonzero(first) == 1 and float(first[5, 2]) != 0
    # both maps sum to the point's share of the cosine
    torch.testing.assert_close(exp.scores[0], first.sum().expand(2))
    whole = explain(model, imgs, [0, 0], method="stylianou")
    torch.testing.assert_close(first[5, 2], whole.raw_maps[0, 0, 5, 2])


def test_decomposition_figure(tmp_path, model):
    exp = explain(model, torch.randn(3, 3, SIZE, SIZE), [0, 0, 1], method="stylianou")
    figure = exp.plot()
    assert isinstance(figure, Figure)
    titles = [ax.get_title() for ax in figure.axes if ax.images]
    expected = [f"{role} (label {label})\ns = {float(s):.3g}"
                for role, label, s in zip(exp.roles, [0, 0, 1], exp.scores[0])]
    assert titles == expected  # each image's share of the margin
    out = tmp_path / "stylianou.png"
    assert exp.save(out, dpi=40) == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
