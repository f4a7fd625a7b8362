"""The memory layout of the perturbed images a black-box method hands a PyTorch module.

A black-box map costs its model's forward passes, and on a CPU PyTorch's convolutions run
many networks faster on channels-last (NHWC) tensors than on the default NCHW ones. Measured
on one batch of perturbed images as ``sbsm`` and ``rise`` run it
(``benchmarks/results/bench_layout.md``, 2 threads, two runs): EfficientNet-Lite0 0.80-0.86x
and ResNet-50 0.86-0.92x NCHW's time; ConvNeXt-T 0.94-1.08x, ViT-S/16 0.94-1.01x and Swin-T
0.97-0.99x, within the spread of their repeats: their weights sit in linear layers. So a
module gets channels-last images when it runs on a CPU in float32 and holds more
parameters in 2-d convolutions than in linear layers; every other model gets its images
as they are. The layout changes no value the model computes, only the order of float32
sums in its kernels (the benchmark checks the embeddings agree, the tests that the maps
do).

A module that cannot take a channels-last tensor (one that calls ``.view`` on its input)
gets the same batch again in NCHW, and NCHW from then on.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["prefers_channels_last", "fall_back_to_nchw", "in_model_layout"]

_PREFERS: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def _parameter_count(model: nn.Module, kind: type) -> int:
    return sum(p.numel() for m in model.modules() if isinstance(m, kind)
               for p in m.parameters(recurse=False))


def prefers_channels_last(model: Any, images: Tensor) -> bool:
    """Whether ``images`` go to ``model`` channels-last: a module, on a CPU, in float32,
    that is mostly 2-d convolutions and has taken channels-last input before (or not yet
    been tried)."""
    if not isinstance(model, nn.Module) or images.dim() != 4 or \
            images.device.type != "cpu" or images.dtype != torch.float32:
        return False
    verdict = _PREFERS.get(model)
    if verdict is None:
        verdict = _parameter_count(model, nn.Conv2d) > _parameter_count(model, nn.Linear)
        _PREFERS[model] = verdict
    return verdict


def fall_back_to_nchw(model: nn.Module) -> None:
    """Remember that ``model`` failed on channels-last input: NCHW from now on."""
    _PREFERS[model] = False


def in_model_layout(model: Any, images: Tensor) -> Tensor:
    """``images`` in the layout :func:`prefers_channels_last` picks for ``model``."""
    if prefers_channels_last(model, images):
        return images.contiguous(memory_format=torch.channels_last)
    return images
