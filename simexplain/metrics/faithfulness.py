"""Faithfulness: delete (or reveal) pixels in the order a map ranks them, track the similarity."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.embeddings import finite_embeddings
from ..engine.inputs import check_tuple_inputs
from ..engine.state import preserved_state
from ..errors import InputError
from ._maps import MapsLike, at_size, map_batch, pixel_order_ranks

__all__ = [
    "DEFAULT_BLUR_SIGMA",
    "tuple_similarity",
    "PerturbationCurve",
    "perturbation_curve",
    "deletion_auc",
    "insertion_auc",
]

#: Default standard deviation, in pixels, of the Gaussian blur used as baseline.
DEFAULT_BLUR_SIGMA = 5.0


def tuple_similarity(*embeddings: Tensor) -> Tensor:
    """The similarity tracked by default: cosine of a pair, margin of a triplet.

    Pairs ``(f1, f2)``: ``cos(f1, f2)``. Triplets ``(fa, fp, fn)``:
    ``cos(fa, fp) - cos(fa, fn)``. Embeddings are ``(N, d)``; returns ``(N,)``.

    >>> f = torch.eye(3)
    >>> tuple_similarity(f[:1], f[:1]), tuple_similarity(f[:1], f[:1], f[1:2])
    (tensor([1.]), tensor([1.]))
    """
    if len(embeddings) not in (2, 3):
        raise InputError(f"tuple_similarity takes 2 or 3 embeddings, got {len(embeddings)}")
    unit = [F.normalize(f, dim=-1) for f in embeddings]
    positive = (unit[0] * unit[1]).sum(-1)
    return positive if len(unit) == 2 else positive - (unit[0] * unit[2]).sum(-1)


@dataclass
class PerturbationCurve:
    """Similarity of tuples while pixels are deleted from (or revealed in) their images.

    Attributes:
        fractions: ``(S + 1,)`` fraction of pixels deleted or revealed at each step,
            from 0 to 1.
        curves: ``(B, K, S + 1)`` similarity at each step. ``perturb="each"``: one row
            per perturbed slot (the others intact), in the order of ``slots``;
            ``perturb="all"``: ``K = 1``, all ``slots`` perturbed together.
        auc: ``(B, K)`` area under each curve over ``fractions`` (trapezoid rule), i.e.
            its mean height, in similarity units.
        original: ``(B,)`` similarity of the unperturbed tuples.
        mode: ``"deletion"`` or ``"insertion"``.
        perturb: ``"each"`` or ``"all"``.
        slots: the perturbed slots.
    """

    fractions: Tensor
    curves: Tensor
    auc: Tensor
    original: Tensor
    mode: str
    perturb: str
    slots: tuple[int, ...]


def _gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur with edge replication (any image size)."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma).square())
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    horizontal = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    padded = F.conv2d(padded, horizontal, groups=channels)
    return F.conv2d(padded, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def _baseline(images: Tensor, baseline: Union[str, float, Tensor], sigma: float) -> Tensor:
    if isinstance(baseline, str):
        if baseline == "blur":
            return _gaussian_blur(images, sigma)
        if baseline == "mean":
            return images.mean((-2, -1), keepdim=True).expand_as(images)
        raise InputError(
            f"baseline={baseline!r} is not known; use 'blur', 'mean', a number or a tensor "
            "broadcastable to the images (C, 1, 1), (B, C, H, W), ..."
        )
    try:
        fill = torch.as_tensor(baseline, dtype=images.dtype, device=images.device)
        return fill.expand_as(images)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(
            f"baseline of shape {tuple(getattr(baseline, 'shape', ()))} does not broadcast to "
            f"images of shape {tuple(images.shape)}"
        ) from None


def _embed(model: nn.Module, images: Tensor) -> Tensor:
    """L2-normalised embeddings ``(N, d)``."""
    problem = (
        "the model returned NaN or Inf embeddings for perturbed images; check the baseline "
        "values and the model's input range"
    )
    return F.normalize(finite_embeddings(model(images), images.shape[0], problem), dim=-1)


def _perturbed_embeddings(
    model: nn.Module,
    images: Tensor,
    base: Tensor,
    ranks: Tensor,
    counts: Tensor,
    insertion: bool,
    batch_size: int,
) -> Tensor:
    """Embeddings ``(S + 1, B, d)`` of every step's images, in forwards of ``batch_size``."""
    batch, _, height, width = images.shape
    total = counts.numel() * batch
    parts = []
    for start in range(0, total, batch_size):
        index = torch.arange(start, min(start + batch_size, total), device=images.device)
        step, item = index // batch, index % batch
        # A pixel is perturbed at a step when its rank is below that step's pixel count.
        changed = ranks[item] < counts[step, None]
        keep = changed if insertion else ~changed
        keep = keep.view(-1, 1, height, width)
        parts.append(_embed(model, torch.where(keep, images[item], base[item])))
    return torch.cat(parts).view(counts.numel(), batch, -1)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"{name}={value!r} is not one of {choices}")


def _check_positive(**counts: Any) -> None:
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")


def _check_slots(slots: Optional[Sequence[int]], num_slots: int) -> tuple[int, ...]:
    if slots is None:
        return tuple(range(num_slots))
    chosen = tuple(int(s) for s in slots)
    if not chosen or len(set(chosen)) != len(chosen) or not all(0 <= s < num_slots for s in chosen):
        raise InputError(f"slots={slots!r} must list distinct slot indices in 0..{num_slots - 1}")
    return chosen


def _similarity_of(
    similarity: Callable[..., Tensor], embeddings: list[Tensor], shape: tuple[int, ...]
) -> Tensor:
    """Similarity of tuples whose slot embeddings are ``(*shape, d)``; returns ``shape``."""
    flat = [f.reshape(-1, f.shape[-1]) for f in embeddings]
    values = similarity(*flat)
    if not isinstance(values, Tensor) or values.shape != (flat[0].shape[0],):
        raise InputError(
            f"similarity returned {getattr(values, 'shape', type(values).__name__)} for "
            f"{flat[0].shape[0]} tuples; it must return one value per tuple, shape (N,)"
        )
    return values.reshape(shape)


def perturbation_curve(
    model: nn.Module,
    tuples: Sequence[Tensor],
    maps: MapsLike,
    *,
    mode: str = "deletion",
    perturb: str = "each",
    slots: Optional[Sequence[int]] = None,
    steps: int = 20,
    baseline: Union[str, float, Tensor] = "blur",
    blur_sigma: float = DEFAULT_BLUR_SIGMA,
    similarity: Optional[Callable[..., Tensor]] = None,
    batch_size: int = 64,
) -> PerturbationCurve:
    """Delete or reveal pixels in the order the maps rank them and track the similarity.

    Each image's map is upsampled to the image and its pixels ranked, highest first, ties
    in row-major order (so an all-zero map perturbs pixels from the top-left, an
    uninformed order). At step ``s`` of ``steps`` the top ``round(s / steps * H * W)``
    pixels are perturbed in every channel:

    * ``mode="deletion"``: they are replaced by the baseline, starting from the image;
    * ``mode="insertion"``: they are revealed, starting from the baseline.

    Good maps make deletion curves fall fast (low AUC) and insertion curves rise fast
    (high AUC). All steps' images are embedded in chunks of ``batch_size`` under
    ``torch.no_grad`` with the model in eval mode; its modes are restored afterwards.

    Args:
        model: maps images ``(N, C, H, W)`` to embeddings ``(N, d)``.
        tuples: 2 or 3 image batches ``(B, C, H, W)`` (pair, or anchor, positive,
            negative), or 4 with ``similarity=``.
        maps: one map per slot, see :data:`MapsLike`.
        mode: ``"deletion"`` or ``"insertion"``.
        perturb: ``"each"``: one image at a time, the others intact, a curve per slot;
            ``"all"``: all chosen slots together, one curve.
        slots: the slots to perturb (default all).
        steps: number of steps; ``steps + 1`` points from 0 to 1.
        baseline: what deleted pixels become: ``"blur"`` (Gaussian blur of the image with
            ``blur_sigma`` pixels, the default), ``"mean"`` (the image's mean per
            channel), a number, or a tensor broadcastable to ``(B, C, H, W)`` such as a
            per-channel fill ``(C, 1, 1)``.
        blur_sigma: standard deviation of the blur in pixels.
        similarity: a function of the slots' normalised embeddings, each ``(N, d)``,
            returning ``(N,)``; default :func:`tuple_similarity`.
        batch_size: images per forward pass.

    Returns:
        A :class:`PerturbationCurve`.

    >>> model = torch.nn.Flatten()                    # the embedding is the image itself
    >>> x1 = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    >>> x2 = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]]])
    >>> result = perturbation_curve(model, (x1, x2), torch.ones(1, 2, 2, 2), steps=2,
    ...                             baseline=0.0, perturb="all")
    >>> result.curves                                 # cos at 0, 2 and 4 deleted pixels
    tensor([[[0.7071, 0.0000, 0.0000]]])
    """
    _check_choice("mode", mode, ("deletion", "insertion"))
    _check_choice("perturb", perturb, ("each", "all"))
    images = check_tuple_inputs(tuples)
    grid = map_batch(maps)
    if grid.shape[:2] != (images[0].shape[0], len(images)):
        raise InputError(
            f"maps cover {tuple(grid.shape[:2])} (batch, slots) but the tuples are "
            f"{(images[0].shape[0], len(images))}; pass one map per image of every tuple"
        )
    _check_positive(steps=steps, batch_size=batch_size)
    if not blur_sigma > 0:
        raise InputError(f"blur_sigma must be positive, got {blur_sigma!r}")
    chosen = _check_slots(slots, len(images))
    if similarity is None and len(images) not in (2, 3):
        raise InputError(
            f"no default similarity for {len(images)}-image tuples; pass similarity=, a "
            "function of the slots' normalised embeddings (N, d) returning (N,)"
        )
    similarity = similarity or tuple_similarity

    batch, _, height, width = images[0].shape
    device = images[0].device
    fractions = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    counts = torch.round(fractions * height * width).long().to(device)
    grid = at_size(grid.to(device), (height, width))
    with torch.no_grad():
        bases = {slot: _baseline(images[slot], baseline, blur_sigma) for slot in chosen}
    with preserved_state(model, eval_mode=True), torch.no_grad():
        originals = [_embed(model, x) for x in images]
        perturbed = {}
        for slot in chosen:
            perturbed[slot] = _perturbed_embeddings(
                model,
                images[slot],
                bases[slot],
                pixel_order_ranks(grid[:, slot].flatten(1)),
                counts,
                mode == "insertion",
                batch_size,
            )
        shape = (steps + 1, batch)
        intact = [f.expand(*shape, -1) for f in originals]
        groups = [[slot] for slot in chosen] if perturb == "each" else [list(chosen)]
        curves = []
        for group in groups:
            slot_embeddings = [
                perturbed[i] if i in group else intact[i] for i in range(len(intact))
            ]
            curves.append(_similarity_of(similarity, slot_embeddings, shape).t())
        original = _similarity_of(similarity, originals, (batch,))
    curves = torch.stack(curves, dim=1).float()
    fractions = fractions.to(device=device, dtype=curves.dtype)
    return PerturbationCurve(
        fractions=fractions,
        curves=curves,
        auc=torch.trapezoid(curves, fractions, dim=-1),
        original=original.float(),
        mode=mode,
        perturb=perturb,
        slots=chosen,
    )


def deletion_auc(
    model: nn.Module, tuples: Sequence[Tensor], maps: MapsLike, **options: Any
) -> PerturbationCurve:
    """Deletion curve and AUC: :func:`perturbation_curve` with ``mode="deletion"``.

    Lower ``auc`` is better: the similarity collapses once the top-ranked pixels go.
    ``options`` are the keyword arguments of :func:`perturbation_curve` but ``mode``.
    """
    return perturbation_curve(model, tuples, maps, mode="deletion", **options)


def insertion_auc(
    model: nn.Module, tuples: Sequence[Tensor], maps: MapsLike, **options: Any
) -> PerturbationCurve:
    """Insertion curve and AUC: :func:`perturbation_curve` with ``mode="insertion"``.

    Higher ``auc`` is better: the similarity returns from the top-ranked pixels alone.
    ``options`` are the keyword arguments of :func:`perturbation_curve` but ``mode``.
    """
    return perturbation_curve(model, tuples, maps, mode="insertion", **options)
