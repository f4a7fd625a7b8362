"""Explaining fresh images through a narrowed head.

A class-token transformer explained at its last block's ``norm1`` reads its embedding
from one token, yet the hooked forward runs that block for every token with a graph, and
the backward goes back through every token: 1.10-1.32x a forward for ViT-S/16 at 224 px
(issue 25, ``benchmarks/results/bench_explain.md``). When the model splits at the layer
(:mod:`~simexplain.engine.head_split`) and
:mod:`~simexplain.engine.token_narrowing` narrows its head, the engine runs the *prefix*
(the model up to the cut) without a graph and the narrowed head with one: the key and
value projections of every token, everything else for the class token alone. The maps are
the hooked forward's, to float rounding.

Only token layers are tried (a CNN stage's head is its pooling and is already cheap), and
only where the hooked forward would give the same thing: eval mode, no extra forward
arguments, no graph kept for training, no batch statistics coupling the images, no hooks
on the model itself (the prefix and the head call its submodules, not its ``forward``).

Splitting costs about twelve forwards of one image (a ``torch.fx`` trace, and checks on
two images; 2.2 s for ViT-S/16 at 224 px), and the narrowed head saves about a tenth of a
forward per image (``benchmarks/results/profile_explain.md``), so the engine
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
from .head_split import HeadSplit, cached_split, head_embeddings, layer_leaf, split_key
from .layouts import FeatureLayer
from .outputs import OutputSpec

__all__ = ["SPLIT_AFTER_IMAGES", "narrowed_split", "forward_narrowed"]

#: Images of one size a model explains through the hooked forward before the engine splits
#: it (see the module docs).
SPLIT_AFTER_IMAGES = 64

# Images explained so far, per model and split key; weak, so models can be freed.
_EXPLAINED: "weakref.WeakKeyDictionary[nn.Module, collections.Counter]" = \
    weakref.WeakKeyDictionary()


def narrowed_split(
    model: nn.Module, layer: FeatureLayer, sample: Tensor, output: OutputSpec = None,
    images: int = 0,
) -> Optional[HeadSplit]:
    """The split of ``model`` at ``layer`` whose narrowed head explains images like
    ``sample`` in a call that explains ``images`` images, or ``None`` when the hooked
    forward should be used (not a token layer, hooks on the model itself, too few images
    explained yet, no split, or nothing to narrow)."""
    if layer.layout != "tokens" or _has_own_hooks(model):
        return None
    split = cached_split(model, layer, sample, output, build=False)
    if split is None:
        counter = _EXPLAINED.setdefault(model, collections.Counter())
        key = split_key(model, layer, sample, output)
        counter[key] += images
        if counter[key] < SPLIT_AFTER_IMAGES:
            return None
        split = cached_split(model, layer, sample, output)
    if isinstance(split, HeadSplit) and split.narrowed and split.prefix is not None:
        return split
    return None


def forward_narrowed(
    split: HeadSplit, images: Tensor, output: OutputSpec = None
) -> Optional[tuple[Tensor, Tensor]]:
    """The layer's output as a leaf that requires grad and the embeddings ``(N, d)`` of
    ``images``, the prefix run without a graph and the narrowed head with one.

    ``None`` when the split graphs fail on these images where they passed on the probe
    (the caller then runs the hooked forward, which raises the model's own error if it
    has one); simexplain's own errors, such as non-finite embeddings, are raised."""
    try:
        with torch.no_grad():
            values = list(split.prefix(images))
        activation = layer_leaf(split, values)
        value: Any = split.head(*values)
    except SimExplainError:
        raise
    except Exception:
        return None
    return activation, head_embeddings(value, images.shape[0], output)


def _has_own_hooks(model: nn.Module) -> bool:
    return bool(model._forward_hooks or model._forward_pre_hooks)
