"""The perturbation runner: every image's perturbations embedded a batch at a time and
scored against all of the image's partners, with the model used as a plain function.

The model is any callable ``images (N, C, H, W) -> embeddings (N, d)``: a PyTorch module
(run under ``no_grad``, without hooks, its modes and flags restored afterwards), an ONNX
Runtime session wrapped as a function, or a function calling a service. Scores are
computed in float32 (float64 for a float64 model) whatever the model's precision.
"""

from __future__ import annotations

import contextlib
import numbers
from typing import Any, Callable, Iterator, Optional, Protocol

import torch
from torch import Tensor, nn

from ..._progress import progress_bar
from ...engine.chunking import cpu_items_per_pass
from ...engine.embeddings import finite_embeddings, run_model
from ...engine.input_layout import run_in_layout
from ...engine.maps import full_precision
from ...engine.outputs import OutputSpec
from ...engine.state import frozen_norm_statistics, preserved_state
from ...errors import InputError
from .masks import MaskSet

__all__ = [
    "Accumulator", "check_embedder", "check_batch_size", "default_batch_size", "model_session",
    "embedder", "embed_batches", "perturbed", "run_perturbations",
]

#: The most perturbed images per forward pass by default (on a CPU, fewer for large images).
DEFAULT_BATCH_SIZE = 64


class Accumulator(Protocol):
    """What a method keeps of the scores of its perturbations: its maps, in the end."""

    def add(self, start: int, masks: Tensor, scores: Tensor) -> None:
        """Masks ``start`` to ``start + K - 1`` ``(K, 1, H, W)`` and the scores ``(U, K)``
        of every image perturbed by them."""

    def maps(self) -> Tensor:
        """Signed maps ``(U, h, w)``, one per image: how much its criterion drops when each
        part of it is hidden."""


def check_embedder(model: Any) -> None:
    """Raise :class:`~simexplain.errors.InputError` unless ``model`` can be called on images."""
    if not callable(model):
        raise InputError(
            f"model must be callable, images (N, C, H, W) -> embeddings (N, d), got "
            f"{type(model).__name__}: a PyTorch module, or a function that runs your model "
            "(an ONNX Runtime session, a service)"
        )


def default_batch_size(images: Tensor) -> int:
    """Perturbed images per forward pass: :data:`DEFAULT_BATCH_SIZE`, on a CPU as many as
    hold about six 224 px images, or 24 where the process keeps freed memory (see
    :func:`simexplain.engine.chunking.cpu_items_per_pass`)."""
    if images.device.type != "cpu":
        return DEFAULT_BATCH_SIZE
    return cpu_items_per_pass(images.shape[-2] * images.shape[-1], DEFAULT_BATCH_SIZE)


def check_batch_size(batch_size: Any) -> Optional[int]:
    """``batch_size`` checked: ``None`` (the default) or a positive whole number."""
    if batch_size is None:
        return None
    if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool) \
            or batch_size < 1:
        raise InputError(
            f"batch_size must be a positive number of perturbed images per forward pass, "
            f"got {batch_size!r}; or None for the default"
        )
    return int(batch_size)


@contextlib.contextmanager
def model_session(model: Any, eval_mode: bool = True) -> Iterator[None]:
    """No gradients; a module in eval mode (``eval_mode``) with its modes, flags and batch
    norm statistics as they were afterwards, also when the block raises."""
    with torch.no_grad():
        if not isinstance(model, nn.Module):
            yield
            return
        with preserved_state(model, eval_mode=eval_mode), frozen_norm_statistics(model):
            yield


def embedder(model: Any, output: OutputSpec = None) -> Callable[[Tensor], Tensor]:
    """``embed(images) -> (N, d)``: the model's embeddings, checked finite, in float32 or
    wider; a module on a CPU gets the images in the layout it runs fastest
    (:mod:`~simexplain.engine.input_layout`)."""

    def embed(images: Tensor) -> Tensor:
        raw = run_in_layout(model, images, lambda x: run_model(model, x, (), output))
        return full_precision(finite_embeddings(raw, images.shape[0]))

    return embed


def embed_batches(embed: Callable[[Tensor], Tensor], images: Tensor, batch_size: int) -> Tensor:
    """``embed`` on ``images`` ``batch_size`` at a time, ``(N, d)``."""
    return torch.cat([embed(images[k:k + batch_size])
                      for k in range(0, images.shape[0], batch_size)])


def perturbed(image: Tensor, keep: Tensor, fill: Tensor) -> Tensor:
    """``keep * image + (1 - keep) * fill`` for each mask, ``(K, C, H, W)`` in the image's
    dtype (computed in float32 or wider)."""
    work = full_precision(image)
    fill = fill.to(work)
    return (fill + (work - fill) * keep.to(work)).to(image.dtype)


def run_perturbations(
    embed: Callable[[Tensor], Tensor],
    images: Tensor,
    criterion: Callable[[int, Tensor], Tensor],
    masks: MaskSet,
    fill: Tensor,
    accumulator: Accumulator,
    *,
    batch_size: int,
    progress: Optional[bool],
    name: str,
) -> None:
    """Embed every image ``(U, C, H, W)`` under every mask, ``batch_size`` masks per forward
    pass, score each perturbed image with ``criterion`` and hand the scores to
    ``accumulator``. Each batch of masks is made once and used for every image.

    ``criterion(u, embeddings)`` scores image ``u``'s ``K`` perturbations, ``(K,)``, or
    ``(R, K)`` for an image in ``R`` tuples (:class:`~.criterion.ImageRows`); the
    accumulator gets every image's rows, in image order."""
    count = images.shape[0]
    with progress_bar(count * masks.count, name, "image", enabled=progress) as bar:
        for start in range(0, masks.count, batch_size):
            stop = min(start + batch_size, masks.count)
            keep = masks.batch(start, stop, images.device)
            scores = torch.cat([criterion(u, embed(perturbed(images[u], keep, fill)))
                                .reshape(-1, stop - start) for u in range(count)])
            accumulator.add(start, keep, scores)
            bar.update(count * (stop - start))
