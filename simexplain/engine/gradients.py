"""The gradient of each image's score at the explained layer, and when images are coupled.

GradCAM needs, for every image ``i``, ``d s_i / d A_i``: its own score's gradient at its
own rows of the layer output. When the network after the layer treats images one by one
(eval mode), ``d (sum_j s_j) / d A_i = d s_i / d A_i``, so one backward pass of the sum
gives every image's gradient. A batch norm that normalises with the batch's statistics
(train mode, or ``track_running_stats=False``) *after* the layer couples the images:
``s_j`` then depends on ``A_i`` through the batch mean and variance, and the sum's
gradient mixes every image's score into every row. Coupled images get one backward pass
each (:func:`score_gradient` with ``per_image=True``), which is exact: the batch
statistics are differentiated as the function of the batch that they are, as in
training.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .embeddings import layer_not_on_path
from .maps import full_precision

__all__ = ["layer_gradient", "score_gradient", "batch_statistics_norms"]


def batch_statistics_norms(model: nn.Module) -> list[nn.Module]:
    """The batch norms of ``model`` that normalise with the batch's own statistics in
    their current mode (train mode, or no running statistics kept)."""
    return [
        m for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and (m.training or not m.track_running_stats)
    ]


def layer_gradient(
    outputs: Tensor,
    activation: Tensor,
    grad_outputs: Optional[Tensor] = None,
    *,
    retain_graph: Optional[bool] = None,
    create_graph: bool = False,
) -> Tensor:
    """``d outputs / d activation`` (a vector-Jacobian product with ``grad_outputs``),
    with a clear error when the outputs do not depend on the layer."""
    if not outputs.requires_grad:
        raise layer_not_on_path()
    (gradient,) = torch.autograd.grad(
        outputs,
        activation,
        grad_outputs,
        retain_graph=create_graph if retain_graph is None else retain_graph,
        create_graph=create_graph,
        allow_unused=True,
    )
    if gradient is None:
        raise layer_not_on_path()
    return gradient


def score_gradient(
    scores: Tensor,
    activation: Tensor,
    *,
    partners_fixed: bool = True,
    per_image: bool = False,
    create_graph: bool = False,
    through: Optional[tuple[Tensor, Tensor]] = None,
) -> Tensor:
    """The gradient of each image's score ``(B, T)`` at its own rows of ``activation``
    (rows slot-major: every tuple's first image, then every second image, ...).

    When every score depends on its own image only (``partners_fixed``), one pass of
    their sum gives all of them; otherwise one pass per slot, each keeping its rows; with
    ``per_image`` (coupled images, see the module docs) one pass per image.
    ``through``: the embeddings in the model's half precision and their float32 copy
    that the scores were computed from; the gradient then goes back in two steps, the
    second scaled by a power of two so that float16 does not flush it to zero.
    """
    batch, count = scores.shape
    if per_image:
        passes = [(scores[b, k], [k * batch + b]) for k in range(count) for b in range(batch)]
    elif partners_fixed:
        passes = [(scores.sum(), None)]
    else:
        passes = [(scores[:, k].sum(), list(range(k * batch, (k + 1) * batch)))
                  for k in range(count)]
    grads = []
    for index, (total, rows) in enumerate(passes):
        retain = create_graph or index < len(passes) - 1
        gradient = _gradient(total, activation, through, create_graph, retain)
        grads.append(gradient if rows is None else gradient[rows])
    return grads[0] if len(grads) == 1 else torch.cat(grads)


def _gradient(
    total: Tensor,
    activation: Tensor,
    through: Optional[tuple[Tensor, Tensor]],
    create_graph: bool,
    retain_graph: bool,
) -> Tensor:
    if through is None:
        return layer_gradient(total, activation, retain_graph=retain_graph,
                              create_graph=create_graph)
    low, wide = through
    if not total.requires_grad:
        raise layer_not_on_path()
    (at_embedding,) = torch.autograd.grad(total, wide, retain_graph=True,
                                          create_graph=create_graph)
    peak = float(at_embedding.detach().abs().amax())
    scale = 2.0 ** -math.floor(math.log2(peak)) if 0 < peak < math.inf else 1.0
    gradient = layer_gradient(low, activation, (at_embedding * scale).to(low.dtype),
                              retain_graph=retain_graph, create_graph=create_graph)
    return full_precision(gradient) / scale
