"""What every explanation promises, over drawn tuple kinds, batch sizes (1 included), image
sizes, dtypes, layer layouts, methods and chunk sizes: chunking does not change eval-mode
maps, the model is left as it was, maps are finite and scaled maps lie in [0, 1]."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from model_state import assert_unchanged, snapshot
from simexplain import EmbeddingAttribution
from simexplain.engine import image_maps

pytestmark = pytest.mark.usefixtures("one_thread")


class ConvNet(nn.Module):
    """NCHW: the explained layer ``block`` keeps the image's grid (stride 1)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean(dim=(2, 3)))


class ChannelsLastNet(nn.Module):
    """NHWC: ``block`` is a LayerNorm over the channels of a (N, h, w, C) map."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.block = nn.LayerNorm(6)
        self.head = nn.Linear(6, 5)
        self.output_fmt = "NHWC"

    def forward(self, x):
        return self.head(torch.relu(self.block(self.stem(x).permute(0, 2, 3, 1))).mean(dim=(1, 2)))


class TokenNet(nn.Module):
    """Tokens: 4 px patches, a class token, a token MLP ``block``, mean of the tokens."""

    num_prefix_tokens = 1

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.block = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU())
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)
        return self.head(self.block(tokens).mean(dim=1))


NETS = {"NCHW": ConvNet, "NHWC": ChannelsLastNet, "tokens": TokenNet}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def build(layout: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = NETS[layout]().to(dtype)
    model.train()  # explanations run in eval mode and must put this back
    return model


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layout=st.sampled_from(sorted(NETS)),
    dtype=st.sampled_from(sorted(DTYPES)),
    method=st.sampled_from(["contribution", "sam", "gradcam_cosine", "sam_contrib"]),
    count=st.integers(2, 4),
    batch=st.integers(1, 5),
    side=st.sampled_from([16, 20, 24]),
    chunk=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_explanations_keep_their_promises(layout, dtype, method, count, batch, side, chunk,
                                          seed):
    model = build(layout, DTYPES[dtype])
    g = torch.Generator().manual_seed(seed)
    slots = tuple(torch.randn(batch, 3, side, side, generator=g).to(DTYPES[dtype])
                  for _ in range(count))
    target = torch.rand(batch, generator=g) < 0.5 if count == 2 else None
    before = snapshot(model)
    attr = EmbeddingAttribution(model, "block", method=method)
    whole = attr.attribute_tuples(slots, target, chunk_size=batch)
    chunked = attr.attribute_tuples(slots, target, chunk_size=chunk)
    assert_unchanged(model, before)
    grid = side // 4 if layout == "tokens" else side
    assert whole.maps.shape == (batch, count, grid, grid)
    assert torch.isfinite(whole.maps).all() and (whole.maps >= 0).all()
    scale = float(whole.maps.abs().max())
    tolerance = 1e-5 if dtype != "bfloat16" else 2e-2  # kernels may sum per chunk size
    torch.testing.assert_close(chunked.maps, whole.maps, rtol=tolerance,
                               atol=tolerance * max(scale, 1e-30))
    scaled = image_maps(whole.maps, (side, side))
    assert torch.isfinite(scaled).all() and scaled.min() >= 0 and scaled.max() <= 1
