"""The memory layout of the images simexplain hands a PyTorch module.

Most of what an explanation costs is its model's forward passes, and on a CPU PyTorch's
convolutions run many networks faster on channels-last (NHWC) tensors than on the default
NCHW ones. Measured on one batch of perturbed images as ``sbsm`` and ``rise`` run it
(``benchmarks/results/bench_layout.md``, 2 threads, two runs): EfficientNet-Lite0 0.80-0.86x
and ResNet-50 0.86-0.92x NCHW's time; ConvNeXt-T 0.94-1.08x, ViT-S/16 0.94-1.01x and Swin-T
0.97-0.99x, within the spread of their repeats: their weights sit in linear layers. So a
module gets channels-last images when it runs on a CPU in float32 and holds more
parameters in 2-d convolutions than in linear layers; every other model gets its images
as they are. Every pass that computes maps or embeddings follows this rule: the gradient
engine's forward for maps (not for training) and ``embed``, the stored-activation trunk
(:func:`~simexplain.engine.stored.run_trunk`) and the black-box runner. The layout changes
no value the model computes, only the order of float32 sums in its kernels (the benchmark
checks the embeddings agree, the tests that the maps do).

A module that cannot take a channels-last tensor (one that calls ``.view`` on its input)
gets the same batch again in NCHW, and NCHW from then on. Inside :func:`nchw_only` every
module gets its images as given, for values bit-identical to a plain ``model(images)``.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from typing import Any, Callable, Iterator, TypeVar

import torch
from torch import Tensor, nn

from ..errors import ModelForwardError

__all__ = ["prefers_channels_last", "mostly_linear", "fall_back_to_nchw", "in_model_layout",
           "run_in_layout", "nchw_only"]

_PREFERS: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()
_NCHW_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("nchw_only", default=False)

T = TypeVar("T")


def _parameter_count(model: nn.Module, kind: type) -> int:
    return sum(p.numel() for m in model.modules() if isinstance(m, kind)
               for p in m.parameters(recurse=False))


def mostly_linear(model: nn.Module) -> bool:
    """Whether ``model`` holds at least as many parameters in linear layers as in 2-d
    convolutions, and some in linear layers (a transformer, a ConvNeXt)."""
    linear = _parameter_count(model, nn.Linear)
    return linear > 0 and linear >= _parameter_count(model, nn.Conv2d)


def prefers_channels_last(model: Any, images: Tensor) -> bool:
    """Whether ``images`` go to ``model`` channels-last: a module, on a CPU, in float32,
    that is mostly 2-d convolutions and has taken channels-last input before (or not yet
    been tried), outside :func:`nchw_only`."""
    if _NCHW_ONLY.get() or not isinstance(model, nn.Module) or images.dim() != 4 or \
            images.device.type != "cpu" or images.dtype != torch.float32:
        return False
    verdict = _PREFERS.get(model)
    if verdict is None:
        verdict = _parameter_count(model, nn.Conv2d) > _parameter_count(model, nn.Linear)
        _PREFERS[model] = verdict
    return verdict


@contextlib.contextmanager
def nchw_only() -> Iterator[None]:
    """Within the block, every model gets its images in the layout they are given in.

    For embeddings and maps computed with the same kernels as ``model(images)`` on NCHW
    images, bit for bit; outside it they agree to float32 rounding.

    >>> import torch
    >>> from simexplain.engine import SimilarityEngine
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    >>> images = torch.rand(2, 3, 8, 8)
    >>> with nchw_only():
    ...     same = SimilarityEngine(net).embed(images)
    >>> torch.equal(same, net(images))
    True
    """
    token = _NCHW_ONLY.set(True)
    try:
        yield
    finally:
        _NCHW_ONLY.reset(token)


def fall_back_to_nchw(model: nn.Module) -> None:
    """Remember that ``model`` failed on channels-last input: NCHW from now on."""
    _PREFERS[model] = False


def in_model_layout(model: Any, images: Tensor) -> Tensor:
    """``images`` in the layout :func:`prefers_channels_last` picks for ``model``."""
    if prefers_channels_last(model, images):
        return images.contiguous(memory_format=torch.channels_last)
    return images


def run_in_layout(model: Any, images: Tensor, run: Callable[[Tensor], T]) -> T:
    """``run(images)`` with ``images`` in ``model``'s layout (:func:`in_model_layout`).

    When ``run`` raises :class:`~simexplain.errors.ModelForwardError` on channels-last
    images, it runs again on ``images`` as given (raising what NCHW raises) and the model
    gets NCHW from then on. ``run`` must be safe to call twice (reset what it records)."""
    laid_out = in_model_layout(model, images)
    try:
        return run(laid_out)
    except ModelForwardError:
        if laid_out is images:
            raise
    result = run(images)
    fall_back_to_nchw(model)
    return result
