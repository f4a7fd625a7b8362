"""The correspondence benchmark's cost: the full matrix of one pair against a forward pass
over the pair, ResNet-50 (the exact path) and ViT-S/16 (the estimate), random weights."""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from simexplain.methods import PairCorrespondence


def _seconds(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def time_pair(model: nn.Module, layer: Optional[str], x1: Tensor, x2: Tensor, repeats: int,
              **options: Any) -> dict:
    """Median (and min, max) seconds of a forward pass over the pair (``torch.no_grad``)
    and of ``PairCorrespondence(model, layer, **options).matrices(x1, x2)``, measured
    alternately ``repeats`` times after one warm-up of each, and their ratio."""
    model.eval()
    both = torch.cat([x1, x2])
    method = PairCorrespondence(model, layer, **options)

    def forward() -> None:
        with torch.no_grad():
            model(both)

    forward()
    result = method.matrices(x1, x2)
    forwards, matrices = [], []
    for _ in range(repeats):
        forwards.append(_seconds(forward))
        matrices.append(_seconds(lambda: method.matrices(x1, x2)))
    ratios = [m / f for f, m in zip(forwards, matrices)]
    forward_s, matrix_s = statistics.median(forwards), statistics.median(matrices)
    return {
        "layer": result.layer, "grid": list(result.grids[0]), "exact": result.exact,
        "projections": result.projections, "repeats": repeats,
        "forward_s": forward_s, "forward_min_s": min(forwards), "forward_max_s": max(forwards),
        "matrix_s": matrix_s, "matrix_min_s": min(matrices), "matrix_max_s": max(matrices),
        "ratio": matrix_s / forward_s, "ratio_min": min(ratios), "ratio_max": max(ratios),
    }


def resnet50() -> nn.Module:
    """torchvision's ResNet-50, random weights, its 2048-d pooled features (``fc``
    removed): the exact path."""
    import torchvision

    model = torchvision.models.resnet50(weights=None)
    model.fc = nn.Identity()
    return model.eval()


def vit_small(size: int) -> Optional[nn.Module]:
    """timm's ViT-S/16, random weights, its class token (384-d): the estimate; ``None``
    without timm."""
    try:
        import timm
    except ImportError:
        return None
    return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0,
                             img_size=size).eval()


def timings(size: int, repeats: int, vit_projections: Any = "auto",
            seed: int = 0) -> dict[str, dict]:
    """The timing table's rows: one pair of random images at ``size`` px per model (the
    ViT's estimate with ``vit_projections``), each with the machine's load averages
    before and after (other processes on a small machine slow both timings, unevenly)."""
    g = torch.Generator().manual_seed(seed)
    x1, x2 = torch.randn(2, 1, 3, size, size, generator=g)
    torch.manual_seed(seed)
    rows = {"ResNet-50 (layer4, pooled)": _loaded(
        lambda: time_pair(resnet50(), "layer4", x1, x2, repeats))}
    vit = vit_small(size)
    if vit is not None:
        rows["ViT-S/16 (class token)"] = _loaded(
            lambda: time_pair(vit, None, x1, x2, repeats, projections=vit_projections))
    return rows


def _loaded(run: Callable[[], dict]) -> dict:
    before = os.getloadavg()[0]
    row = run()
    return {**row, "load_before": before, "load_after": os.getloadavg()[0]}
