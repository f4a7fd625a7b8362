"""Explaining fresh images through the model split at its layer.

The hooked forward runs the model as its ``forward`` does. When the model splits at the
layer (:mod:`~simexplain.engine.head_split`), the engine can instead run the *prefix*
(the model up to the cut) without a graph and the head with one, and two things then cost
less:

* a class-token transformer explained at its last block's ``norm1`` reads its embedding
  from one token, yet the hooked forward runs that block for every token with a graph
  (1.10-1.32x a forward for ViT-S/16 at 224 px, issue 25);
  :mod:`~simexplain.engine.token_narrowing` narrows the head to the class token;
* a network whose weights sit mostly in linear layers (a transformer, a ConvNeXt) runs
  its prefix's linear layers as oneDNN kernels on a CPU, each with the activation after
  it fused in (:mod:`~simexplain.engine._fused_kernels`).

The maps are the hooked forward's, to float rounding. Models that gain neither (a CNN
stage's head is its pooling, and mostly convolutional networks take channels-last images
instead, :mod:`~simexplain.engine.input_layout`) are not traced. The split path is
taken only where the hooked forward would give the same thing: eval mode, no extra
forward arguments, no graph kept for training, no batch statistics coupling the images, no
forward hook on the model or on a module whose code the prefix or the head runs inline
(where it would not fire), and none for all modules.

Splitting costs about twelve forwards of one image (a ``torch.fx`` trace, and checks on
two images; 2.2 s for ViT-S/16 at 224 px), and the split path saves a tenth to a fifth
of a forward per image (``benchmarks/results/profile_explain.md``,
``benchmarks/results/bench_explain.md``), so the engine
splits a model only once it has explained :data:`SPLIT_AFTER_IMAGES` images of a size
with it, counting the current call: a one-off explanation of a pair does not pay for a
split, a dataset does. Both paths give the same maps to float rounding.
"""

from __future__ import annotations

import collections
import weakref
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..errors import SimExplainError
from ._fused_kernels import fused_kernels_available, global_module_hooks
from .head_split import HeadSplit, cached_split, head_embeddings, layer_leaf, split_key
from .input_layout import mostly_linear
from .layouts import FeatureLayer
from .outputs import OutputSpec

__all__ = ["SPLIT_AFTER_IMAGES", "split_for_maps", "forward_split", "prefix_for"]

#: Images of one size a model explains through the hooked forward before the engine splits
#: it (see the module docs).
SPLIT_AFTER_IMAGES = 64

# Images explained so far, per model and split key; weak, so models can be freed.
_EXPLAINED: "weakref.WeakKeyDictionary[nn.Module, collections.Counter]" = \
    weakref.WeakKeyDictionary()


def split_for_maps(
    model: nn.Module, layer: FeatureLayer, sample: Tensor, output: OutputSpec = None,
    images: int = 0,
) -> Optional[HeadSplit]:
    """The split of ``model`` at ``layer`` that explains images like ``sample`` in a call
    that explains ``images`` images, or ``None`` when the hooked forward should be used
    (nothing to gain, a hook the split path would not fire, too few images explained
    yet, no split, or neither a narrowed head nor a fused prefix)."""
    if global_module_hooks() or not _may_gain(model, layer, sample):
        return None
    split = cached_split(model, layer, sample, output, build=False)
    if split is None:
        counter = _EXPLAINED.setdefault(model, collections.Counter())
        key = split_key(model, layer, sample, output)
        counter[key] += images
        # A split checks itself against the model: not while a hook changes the model.
        if counter[key] < SPLIT_AFTER_IMAGES or any(map(_hooked, model.modules())):
            return None
        split = cached_split(model, layer, sample, output)
    if isinstance(split, HeadSplit) and split.prefix is not None and \
            (split.narrowed or split.fused_prefix is not None) and \
            not any(map(_hooked, split.inlined)):
        return split
    return None


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def forward_split(
    split: HeadSplit, images: Tensor, output: OutputSpec = None
) -> Optional[tuple[Tensor, Tensor]]:
    """The layer's output as a leaf that requires grad and the embeddings ``(N, d)`` of
    ``images``, the prefix run without a graph (fused where it can be) and the head with
    one.

    ``None`` when the split graphs fail on these images where they passed on the probe
    (the caller then runs the hooked forward, which raises the model's own error if it
    has one); simexplain's own errors, such as non-finite embeddings, are raised."""
    try:
        with torch.no_grad():
            values = list(prefix_for(split, images)(images))
        activation = layer_leaf(split, values)
        value: Any = split.head(*values)
    except SimExplainError:
        raise
    except Exception:
        return None
    return activation, head_embeddings(value, images.shape[0], output)


def prefix_for(split: HeadSplit, images: Tensor) -> Any:
    """The prefix that runs ``images``: the fused one where it is usable."""
    fused = split.fused_prefix
    return fused.module if fused is not None and fused.usable(images) else split.prefix


def _may_gain(model: nn.Module, layer: FeatureLayer, sample: Tensor) -> bool:
    """Whether a split could narrow the head (a token layer) or fuse kernels (a network of
    linear layers, on float32 CPU images)."""
    return layer.layout == "tokens" or (
        sample.device.type == "cpu" and sample.dtype == torch.float32
        and fused_kernels_available() and mostly_linear(model))
