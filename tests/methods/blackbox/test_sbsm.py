"""``"sbsm"``: each map cell is the criterion's drop when the window centred on it is hidden,
computed by hand on tiny images and checked against the gradient methods' own scores."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from networks import gap_model
from simexplain import InputError, explain
from simexplain.methods import SBSM, cosine_coefficients
from simexplain.methods.blackbox import SlidingWindows

pytestmark = pytest.mark.usefixtures("one_thread")

BIAS = torch.tensor([0.2, -0.1, 0.3], dtype=torch.float64)


def corner_embedding(x: torch.Tensor) -> torch.Tensor:
    """The mean colour of the top-left quadrant, plus a bias (so that hiding part of the
    quadrant turns the embedding, not only shortens it)."""
    height, width = x.shape[-2:]
    return x[:, :, : height // 2, : width // 2].mean(dim=(2, 3)) + BIAS.to(x)


def images(count: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, size, size, generator=generator, dtype=torch.float64)


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=-1))


def test_the_drops_of_a_4x4_pair_by_hand():
    """Windows 2x2, stride 2: four windows, the quadrants. Only the top-left one matters."""
    x1, x2 = images(2, size=4)
    maps = SBSM(corner_embedding, window=2, stride=2).explain((x1[None], x2[None]), relu=False)
    f1, f2 = corner_embedding(x1[None]), corner_embedding(x2[None])
    hidden = BIAS[None]  # the quadrant filled with 0: its mean is 0
    expected_1 = cos(f1, f2) - cos(hidden, f2)
    expected_2 = cos(f2, f1) - cos(hidden, f1)
    assert maps.shape == (1, 2, 2, 2)
    assert float(maps[0, 0, 0, 0]) == pytest.approx(expected_1, abs=1e-12)
    assert float(maps[0, 1, 0, 0]) == pytest.approx(expected_2, abs=1e-12)
    assert maps[0, :, 0, 1].abs().max() == 0 and maps[0, :, 1].abs().max() == 0


def test_overlapping_windows_by_hand():
    """8x8 images, window 4, stride 2: the 4x4 grid's windows are centred on its cells
    (cut at the border); each cell's value is the drop with that window hidden."""
    x = images(3, size=8, seed=1)
    tuples = tuple(x[k : k + 1] for k in range(3))
    maps = SBSM(corner_embedding, window=4, stride=2, fill=0.5).explain(tuples, relu=False)
    embed = [corner_embedding(t) for t in tuples]
    coefficients = cosine_coefficients(3).double()

    def criterion(slot, f):
        return sum(float(coefficients[slot, j]) * cos(f, embed[j]) for j in range(3) if j != slot)

    for slot in range(3):
        for r in range(4):
            for c in range(4):
                hidden = tuples[slot].clone()
                top, left = 2 * r - 1, 2 * c - 1  # centre 2r + 1, half a window before
                hidden[..., max(top, 0) : top + 4, max(left, 0) : left + 4] = 0.5
                drop = criterion(slot, embed[slot]) - criterion(slot, corner_embedding(hidden))
                assert float(maps[0, slot, r, c]) == pytest.approx(drop, abs=1e-12)
    # the last windows (rows / columns 5-7) miss the quadrant (0-3): nothing drops
    assert maps[0, :, 3, :].abs().max() == 0 and maps[0, :, :, 3].abs().max() == 0
    assert maps[0, :, :3, :3].abs().min() > 0


@pytest.mark.parametrize("labels", [[1, 1], [1, 2], [0, 0, 1], [0, 0, 1, 2]])
def test_the_criterion_is_the_gradient_methods_score(labels):
    """The drop at a window is the gradient methods' own score of the image minus its score
    with the window hidden (``contribution``'s and ``gradcam_cosine``'s, partners fixed)."""
    torch.manual_seed(0)
    model = gap_model(head=True).eval()
    x = images(len(labels), size=8, seed=2)
    exp = explain(model, x, labels, method="sbsm", window=4, stride=4, relu=False)
    gradient = explain(model, x, labels, method="contribution", layer="0")
    assert exp.kind == gradient.kind and exp.layer == "" and exp.method == "sbsm"
    torch.testing.assert_close(exp.scores, gradient.scores)
    torch.testing.assert_close(exp.embeddings, gradient.embeddings)
    for slot in range(len(labels)):
        for r, c in [(0, 0), (1, 0), (1, 1)]:
            hidden = x.clone()
            hidden[slot, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] = 0
            # only the hidden image's own score is read: its partners are as given
            occluded = explain(model, hidden, labels, method="gradcam_cosine", layer="0")
            drop = gradient.scores[0, slot] - occluded.scores[0, slot]
            torch.testing.assert_close(exp.raw_maps[0, slot, r, c], drop)


def test_windows_are_centred_on_the_grid_cells():
    windows = SlidingWindows((9, 6), window=(3, 2), stride=(3, 2))
    assert windows.grid == (3, 3) and windows.count == 9
    masks = windows.batch(0, 9, torch.device("cpu"))
    hidden = (masks[:, 0] == 0).nonzero()
    # mask 4 hides the middle cell's window exactly: rows 3-5, columns 2-3
    rows, cols = hidden[hidden[:, 0] == 4, 1], hidden[hidden[:, 0] == 4, 2]
    assert sorted(set(rows.tolist())) == [3, 4, 5] and sorted(set(cols.tolist())) == [2, 3]
    assert SlidingWindows((224, 224)).grid == (8, 8)  # window 56, stride 28 by default
    assert SBSM(corner_embedding).forwards((224, 224)) == 64


@pytest.mark.parametrize("options, match", [
    ({"window": 0}, "window must be a positive whole number of pixels"),
    ({"window": 2.5}, "window must be a positive whole number"),
    ({"stride": (1, 2, 3)}, r"stride must be .* or a pair \(height, width\)"),
    ({"fill": "grey"}, "fill must be a number, or one number per channel"),
    ({"batch_size": 0}, "batch_size must be a positive number of perturbed images"),
])
def test_bad_options_are_refused_when_built(options, match):
    with pytest.raises(InputError, match=match):
        SBSM(corner_embedding, **options)


def test_options_that_do_not_fit_the_images_are_refused():
    x = images(2, size=8)
    with pytest.raises(InputError, match=r"window \(9, 9\) and stride .* must fit the 8x8"):
        SBSM(corner_embedding, window=9).explain((x[:1], x[1:]))
    with pytest.raises(InputError, match="fill has 2 values for images of 3 channels"):
        SBSM(corner_embedding, fill=(0.0, 1.0)).explain((x[:1], x[1:]))
