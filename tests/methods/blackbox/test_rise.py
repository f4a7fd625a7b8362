"""``"rise"``: per pixel, the criterion's mean when the pixel is kept minus its mean when it
is hidden; its masks, seeds and batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from simexplain import InputError
from simexplain.methods import RISE
from simexplain.methods.blackbox import HeldPartners, RandomMasks

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
BIAS = torch.tensor([0.2, -0.1, 0.3], dtype=torch.float64)


def corner_embedding(x: torch.Tensor) -> torch.Tensor:
    """The mean colour of the top-left quadrant, plus a bias."""
    height, width = x.shape[-2:]
    return x[:, :, : height // 2, : width // 2].mean(dim=(2, 3)) + BIAS.to(x)


def pair(size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(2, 1, 3, size, size, generator=torch.Generator().manual_seed(seed),
                   dtype=torch.float64)
    return x[0], x[1]


def test_the_map_is_on_the_quadrant_the_embedding_reads():
    maps = RISE(corner_embedding, n_masks=600, grid=4, seed=1).explain(pair(), relu=False)
    inside, outside = maps[..., :8, :8], maps[..., 8:, 8:]
    assert bool((inside.mean(dim=(-2, -1)) > 0).all())
    # the far quadrant's values are noise around 0, small against the signal
    assert float(outside.abs().mean()) < 0.1 * float(inside.mean())


def test_the_estimator_by_hand():
    """Kept minus hidden, each mask weighted by how much it keeps (hides) the pixel."""
    x1, x2 = pair(size=8, seed=3)
    method = RISE(corner_embedding, n_masks=40, grid=3, p=0.3, seed=5, batch_size=7)
    maps = method.explain((x1, x2), relu=False)
    masks = RandomMasks((8, 8), 40, 3, 0.3, 5).batch(0, 40, CPU)[:, 0].double()
    f1, f2 = corner_embedding(x1), corner_embedding(x2)
    scores = F.cosine_similarity(corner_embedding(x1 * masks[:, None]), f2)
    kept = (scores[:, None, None] * masks).sum(0) / masks.sum(0)
    hidden = (scores[:, None, None] * (1 - masks)).sum(0) / (1 - masks).sum(0)
    torch.testing.assert_close(maps[0, 0], kept - hidden)
    assert float(F.cosine_similarity(f1, f2)) != 0


def test_a_seed_gives_the_same_maps_and_another_seed_others():
    x1, x2 = pair(seed=4)
    first = RISE(corner_embedding, n_masks=50, seed=7).explain((x1, x2))
    again = RISE(corner_embedding, n_masks=50, seed=7).explain((x1, x2))
    other = RISE(corner_embedding, n_masks=50, seed=8).explain((x1, x2))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("sizes", [(1, 16), (5, 64)])
def test_batch_size_changes_no_map(sizes):
    x = torch.rand(2, 3, 3, 16, 16, generator=torch.Generator().manual_seed(5),
                   dtype=torch.float64)
    tuples = tuple(x[:, k] for k in range(3))
    small, large = (RISE(corner_embedding, n_masks=30, batch_size=b).explain(tuples)
                    for b in sizes)
    torch.testing.assert_close(small, large, rtol=1e-12, atol=1e-12)


def test_masks_keep_about_p_and_are_made_a_batch_at_a_time():
    masks = RandomMasks((32, 24), n_masks=400, grid=(4, 3), p=0.3, seed=0)
    whole = masks.batch(0, 400, CPU)
    assert whole.shape == (400, 1, 32, 24) and whole.dtype == torch.float32
    assert float(whole.mean()) == pytest.approx(0.3, abs=0.03)
    assert torch.equal(torch.cat([masks.batch(k, k + 7, CPU) for k in range(0, 400, 7)]), whole)
    assert masks.cell == (8, 8)
    # smooth: bilinear upsampling leaves values between 0 and 1
    assert float(((whole > 0) & (whole < 1)).float().mean()) > 0.1


def test_the_criterion_scores_a_perturbed_image_against_all_its_partners():
    """The anchor of a quadruplet, embedded as ``g``: 2 cos(g, p) - cos(g, n1) - cos(g, n2)."""
    f = F.normalize(torch.randn(4, 1, 5, dtype=torch.float64), dim=-1)
    held = HeldPartners.of_tuples(f)
    g = torch.randn(3, 5, dtype=torch.float64)
    unit = F.normalize(g, dim=-1)
    expected = 2 * unit @ f[1, 0] - unit @ f[2, 0] - unit @ f[3, 0]
    torch.testing.assert_close(held(0, g), expected)
    torch.testing.assert_close(held.values[0, 0], expected.new_tensor(
        float(2 * f[0, 0] @ f[1, 0] - f[0, 0] @ f[2, 0] - f[0, 0] @ f[3, 0])))
    assert held.kind == "quadruplet"


@pytest.mark.parametrize("options, match", [
    ({"p": 1.0}, "p, the probability that a grid cell is kept, must lie strictly between"),
    ({"p": 0}, "strictly between 0 and 1"),
    ({"n_masks": 0}, "n_masks must be a positive whole number"),
    ({"grid": 0}, "grid must be a positive whole number of cells"),
    ({"seed": 1.5}, "seed must be a whole number"),
])
def test_bad_options_are_refused_when_built(options, match):
    with pytest.raises(InputError, match=match):
        RISE(corner_embedding, **options)
