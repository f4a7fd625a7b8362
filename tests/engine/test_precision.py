"""Half-precision models: scores, norms and maps are computed in float32, so float16 and
bfloat16 explanations match float32 ones and never turn NaN or zero."""

import pytest
import torch
from torch import nn

from simexplain import explain
from simexplain.engine import full_precision, gradcam_maps, image_maps, scale_maps

pytestmark = pytest.mark.usefixtures("one_thread")

#: Relative error of the raw maps against float32: float16 keeps 11 bits, bfloat16 8.
TOLERANCE = {torch.float16: 0.03, torch.bfloat16: 0.15}
LABELS = {2: [0, 0], 3: [0, 0, 1], 4: [0, 0, 1, 2]}


def wide_net(dim: int = 2048) -> nn.Sequential:
    """A conv trunk (the explained layer ``"3"``, 8x8 at 16 px) and a 2048-d head: each
    coordinate of a unit embedding is ~0.02, so a quadruplet's SAM weights are ~1e-5."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, dim),
    ).eval()


def images(count: int) -> torch.Tensor:
    return torch.rand(count, 3, 16, 16, generator=torch.Generator().manual_seed(count))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["sam", "contribution"])
@pytest.mark.parametrize("count", [2, 3, 4])
def test_half_precision_maps_match_float32(dtype, method, count):
    net = wide_net()
    x = images(count)
    reference = explain(net, x, LABELS[count], layer="3", method=method)
    half = explain(net.to(dtype), x.to(dtype), LABELS[count], layer="3", method=method)
    assert half.raw_maps.dtype == torch.float32 and torch.isfinite(half.maps).all()
    assert reference.raw_maps.abs().amax() > 0
    error = (half.raw_maps - reference.raw_maps).norm() / reference.raw_maps.norm()
    assert error < TOLERANCE[dtype], (dtype, method, count, float(error))
    assert next(net.parameters()).dtype == dtype  # the model is left in its own dtype


def test_all_zero_maps_stay_zero_in_float16():
    assert torch.equal(scale_maps(torch.zeros(2, 4, 4, dtype=torch.float16)),
                       torch.zeros(2, 4, 4, dtype=torch.float16))
    assert torch.equal(image_maps(torch.zeros(1, 4, 4, dtype=torch.bfloat16), (8, 8)),
                       torch.zeros(1, 8, 8, dtype=torch.bfloat16))
    # ... and so do the maps of a model whose features are all zero at the layer
    net = wide_net()
    with torch.no_grad():
        net[2].weight.zero_()
        net[2].bias.fill_(-1.0)
    result = explain(net.half(), images(2).half(), [0, 0], layer="3", method="sam")
    assert torch.equal(result.maps, torch.zeros_like(result.maps))


def test_gradcam_combine_runs_in_float32():
    features = torch.full((1, 2, 4, 4), 300.0, dtype=torch.float16)
    gradients = torch.full((1, 2, 4, 4), 300.0, dtype=torch.float16)
    maps = gradcam_maps(features, gradients)  # 2 * 300 * 300 overflows float16
    assert maps.dtype == torch.float32 and torch.allclose(maps, torch.full((1, 4, 4), 1.8e5))
    assert full_precision(torch.zeros(1, dtype=torch.float64)).dtype == torch.float64
