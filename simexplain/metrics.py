"""How good are the maps? Localisation, faithfulness and sanity metrics for similarity maps.

Every metric takes maps as tensors, so it works with any method: ``(B, T, h, w)`` (one map
per slot of each tuple), ``(B, 1, h, w)``, ``(B, h, w)``, or the tuple of ``T`` tensors
``(B, 1, h, w)`` that :meth:`simexplain.EmbeddingAttribution.attribute` returns. Maps at
layer resolution are upsampled bilinearly where pixels are needed.

* Localisation against ground truth: :func:`pointing_game`, :func:`energy_in_box`.
* Faithfulness: :func:`deletion_auc` and :func:`insertion_auc` delete (or reveal) an
  image's pixels in the order its map ranks them and track the tuple's similarity.
* Sanity: :func:`randomization_sanity` compares the maps of a model with those of a copy
  whose top layers are re-initialised (:func:`randomize_top_layers`); a method whose maps
  barely change does not explain the model.

Per-map results have shape ``(B,)`` for single-slot maps and ``(B, T)`` for ``T > 1``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attribution import check_tuple_inputs
from .errors import InputError, LayerError, ModelOutputError
from .layers import embedding_matrix, get_layer
from .maps import scale_maps, upsample_maps
from .state import preserved_state
from .weights import l2_normalize

__all__ = [
    "MapsLike",
    "box_masks",
    "pointing_game",
    "energy_in_box",
    "tuple_similarity",
    "PerturbationCurve",
    "perturbation_curve",
    "deletion_auc",
    "insertion_auc",
    "average_ranks",
    "spearman_correlation",
    "pearson_correlation",
    "MapComparison",
    "compare_maps",
    "randomize_top_layers",
    "SanityResult",
    "randomization_sanity",
]

#: Maps as a tensor ``(B, T, h, w)``, ``(B, 1, h, w)`` or ``(B, h, w)``, or a sequence of
#: ``T`` tensors ``(B, 1, h, w)`` (the output of ``EmbeddingAttribution.attribute``).
MapsLike = Union[Tensor, Sequence[Tensor]]

#: Default standard deviation, in pixels, of the Gaussian blur used as baseline.
DEFAULT_BLUR_SIGMA = 5.0


# --------------------------------------------------------------------------- input checks


def _map_batch(maps: MapsLike, name: str = "maps") -> Tensor:
    """Maps as one float tensor ``(B, T, h, w)``."""
    if isinstance(maps, (tuple, list)):
        if not maps:
            raise InputError(f"{name} is an empty sequence; pass one map tensor per slot")
        parts = [_map_batch(m, f"{name}[{i}]") for i, m in enumerate(maps)]
        for i, part in enumerate(parts):
            if part.shape[1] != 1 or part.shape != parts[0].shape:
                raise InputError(
                    f"{name}[{i}] has shape {tuple(part.shape)}; a sequence of maps must hold "
                    f"one (B, 1, h, w) tensor per slot, all of shape {tuple(parts[0].shape)}"
                )
        return torch.cat(parts, dim=1)
    if not isinstance(maps, Tensor):
        raise InputError(f"{name} is {type(maps).__name__}; expected a tensor (B, T, h, w)")
    if maps.dim() == 3:
        maps = maps.unsqueeze(1)
    if maps.dim() != 4:
        raise InputError(
            f"{name} has shape {tuple(maps.shape)}; expected (B, h, w), (B, 1, h, w) or "
            "(B, T, h, w) with one map per slot"
        )
    if 0 in maps.shape:
        raise InputError(f"{name} has shape {tuple(maps.shape)}; it holds no map values")
    if maps.dtype not in (torch.float32, torch.float64):
        maps = maps.float()
    if not torch.isfinite(maps).all():
        raise InputError(f"{name} contains NaN or Inf values; a map must be finite everywhere")
    return maps.detach()


def _per_map(values: Tensor) -> Tensor:
    """``(B, T)`` values as ``(B,)`` when there is one slot."""
    return values.squeeze(1) if values.shape[1] == 1 else values


def _at_size(maps: Tensor, size: Sequence[int]) -> Tensor:
    return maps if tuple(maps.shape[-2:]) == tuple(size) else upsample_maps(maps, tuple(size))


def box_masks(boxes: Tensor, size: Sequence[int]) -> Tensor:
    """Boolean masks ``(..., H, W)`` of boxes ``(..., 4)`` given as ``x1, y1, x2, y2`` pixels.

    A pixel belongs to a box when its centre ``(col + 0.5, row + 0.5)`` lies in
    ``[x1, x2) x [y1, y2)``, so the integer box ``(0, 0, 2, 1)`` holds pixels
    ``(row 0, col 0)`` and ``(row 0, col 1)``.

    >>> box_masks(torch.tensor([0, 0, 2, 1]), (2, 3)).int()
    tensor([[1, 1, 0],
            [0, 0, 0]], dtype=torch.int32)
    """
    height, width = int(size[0]), int(size[1])
    boxes = boxes.to(torch.float64)
    rows = torch.arange(height, device=boxes.device, dtype=torch.float64) + 0.5
    cols = torch.arange(width, device=boxes.device, dtype=torch.float64) + 0.5
    x1, y1, x2, y2 = (boxes[..., i, None] for i in range(4))
    in_rows = (rows >= y1) & (rows < y2)
    in_cols = (cols >= x1) & (cols < x2)
    return in_rows.unsqueeze(-1) & in_cols.unsqueeze(-2)


def _ground_truth(truth: Tensor, maps: Tensor, image_size: Optional[Sequence[int]]) -> Tensor:
    """Ground truth as bool masks ``(B, T or 1, H, W)`` checked against maps ``(B, T, h, w)``."""
    batch, slots = maps.shape[:2]
    if not isinstance(truth, Tensor):
        raise InputError(
            f"the ground truth is {type(truth).__name__}; pass bool masks (B, H, W) or "
            "boxes (B, 4) as x1, y1, x2, y2 pixels, as tensors"
        )
    if truth.dtype == torch.bool:
        if truth.dim() not in (3, 4):
            raise InputError(
                f"masks have shape {tuple(truth.shape)}; expected (B, H, W) or (B, T, H, W)"
            )
        masks = truth if truth.dim() == 4 else truth.unsqueeze(1)
    elif truth.dim() in (2, 3) and truth.shape[-1] == 4:
        if not torch.isfinite(truth.float()).all():
            raise InputError("boxes contain NaN or Inf values")
        size = maps.shape[-2:] if image_size is None else image_size
        boxes = truth if truth.dim() == 3 else truth.unsqueeze(1)
        masks = box_masks(boxes, size)
    else:
        raise InputError(
            f"the ground truth has shape {tuple(truth.shape)} and dtype {truth.dtype}; pass "
            "bool masks (B, H, W) or (B, T, H, W) (e.g. `mask > 0`), or boxes (B, 4) or "
            "(B, T, 4) as x1, y1, x2, y2 pixels"
        )
    if masks.shape[0] != batch or masks.shape[1] not in (1, slots):
        raise InputError(
            f"the ground truth covers {tuple(masks.shape[:2])} (batch, slots) but the maps "
            f"are {tuple(maps.shape[:2])}; pass one mask or box per map, or one per tuple "
            "(a ground truth that is not bool is read as boxes x1, y1, x2, y2)"
        )
    empty = ~masks.flatten(2).any(-1)
    if empty.any():
        items = empty.nonzero().tolist()[:5]
        raise InputError(
            f"the ground truth of (item, slot) {items} is empty: no pixel lies inside. Boxes "
            "are x1, y1, x2, y2 in pixels of image_size (default: the maps' size) with "
            "x1 < x2 and y1 < y2; pass image_size= when the maps are at layer resolution"
        )
    return masks.to(maps.device)


# --------------------------------------------------------------------------- localisation


def pointing_game(
    maps: MapsLike,
    ground_truth: Tensor,
    *,
    tolerance: float = 0.0,
    image_size: Optional[Sequence[int]] = None,
) -> Tensor:
    """Whether each map's maximum falls on the ground truth (the pointing game).

    Maps are upsampled bilinearly to the ground truth's size. The peak is the first
    maximal pixel in row-major order. A constant map (for example all zero) points
    nowhere and counts as a miss.

    Args:
        maps: see :data:`MapsLike`.
        ground_truth: bool masks ``(B, H, W)`` / ``(B, T, H, W)``, or boxes ``(B, 4)`` /
            ``(B, T, 4)`` as ``x1, y1, x2, y2`` pixels (see :func:`box_masks`). One per
            tuple is shared by all slots.
        tolerance: a hit also when the peak is within this many pixels (Euclidean) of a
            ground-truth pixel; 15 at 224 px is the usual choice.
        image_size: ``(H, W)`` the boxes refer to; default the maps' size.

    Returns:
        Bool hits, ``(B,)`` for one map per tuple, ``(B, T)`` otherwise.

    >>> maps = torch.zeros(2, 4, 4)
    >>> maps[0, 0, 0] = maps[1, 3, 3] = 1.0
    >>> pointing_game(maps, torch.tensor([[0, 0, 2, 2], [0, 0, 2, 2]]))
    tensor([ True, False])
    """
    grid = _map_batch(maps)
    masks = _ground_truth(ground_truth, grid, image_size)
    grid = _at_size(grid, masks.shape[-2:])
    flat = grid.flatten(2)
    peak = flat.argmax(-1)
    width = grid.shape[-1]
    rows = torch.arange(grid.shape[-2], device=grid.device).view(-1, 1)
    cols = torch.arange(width, device=grid.device).view(1, -1)
    row_dist = rows - (peak // width)[..., None, None]
    col_dist = cols - (peak % width)[..., None, None]
    near = row_dist.square() + col_dist.square() <= float(tolerance) ** 2
    hits = (near & masks).flatten(2).any(-1)
    pointing = flat.amax(-1) > flat.amin(-1)
    return _per_map(hits & pointing)


def energy_in_box(
    maps: MapsLike, ground_truth: Tensor, *, image_size: Optional[Sequence[int]] = None
) -> Tensor:
    """Fraction of each map's positive mass inside the ground truth (relevance mass).

    Negative values are clipped to zero before summing. A map with no positive value
    (for example all zero) has no mass to place and scores 0.

    Args:
        maps: see :data:`MapsLike`; upsampled bilinearly to the ground truth's size.
        ground_truth: as in :func:`pointing_game`.
        image_size: ``(H, W)`` the boxes refer to; default the maps' size.

    Returns:
        Float fractions in ``[0, 1]``, ``(B,)`` or ``(B, T)``.

    >>> energy_in_box(torch.ones(1, 4, 4), torch.tensor([[0, 0, 2, 2]]))
    tensor([0.2500])
    """
    grid = _map_batch(maps)
    masks = _ground_truth(ground_truth, grid, image_size)
    positive = _at_size(grid, masks.shape[-2:]).clamp_min(0)
    total = positive.sum((-2, -1))
    inside = (positive * masks).sum((-2, -1))
    return _per_map(torch.where(total > 0, inside / total.clamp_min(1e-30), 0.0))


# --------------------------------------------------------------------------- deletion, insertion


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
    unit = [l2_normalize(f) for f in embeddings]
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


def _pixel_order_ranks(flat_maps: Tensor) -> Tensor:
    """Rank of each value along the last dim, highest first; ties: lower index first."""
    order = flat_maps.sort(dim=-1, descending=True, stable=True).indices
    positions = torch.arange(flat_maps.shape[-1], device=flat_maps.device)
    return torch.empty_like(order).scatter_(-1, order, positions.expand_as(order).contiguous())


def _embed(model: nn.Module, images: Tensor) -> Tensor:
    """L2-normalised embeddings ``(N, d)``."""
    embeddings = embedding_matrix(model(images), images.shape[0])
    if not torch.isfinite(embeddings).all():
        raise ModelOutputError(
            "the model returned NaN or Inf embeddings for perturbed images; check the "
            "baseline values and the model's input range"
        )
    return l2_normalize(embeddings)


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
    grid = _map_batch(maps)
    if grid.shape[:2] != (images[0].shape[0], len(images)):
        raise InputError(
            f"maps cover {tuple(grid.shape[:2])} (batch, slots) but the tuples are "
            f"{(images[0].shape[0], len(images))}; pass one map per image of every tuple"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
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
    grid = _at_size(grid.to(device), (height, width))
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
                _pixel_order_ranks(grid[:, slot].flatten(1)),
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


# --------------------------------------------------------------------------- rank statistics


def average_ranks(values: Tensor) -> Tensor:
    """Ranks along the last dim, 1 for the smallest; tied values share their mean rank.

    Returned in float64 (float32 on MPS), exact for any realistic length.

    >>> average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0])).tolist()
    [4.0, 1.0, 4.0, 2.0, 4.0]
    """
    length = values.shape[-1]
    sorted_values, order = values.sort(dim=-1, stable=True)
    positions = torch.arange(length, device=values.device).expand_as(order)
    differs = sorted_values[..., 1:] != sorted_values[..., :-1]
    edge = torch.ones(*differs.shape[:-1], 1, dtype=torch.bool, device=values.device)
    starts = torch.cat([edge, differs], dim=-1)
    ends = torch.cat([differs, edge], dim=-1)
    # First and last sorted position of each value's tie group, in exact integers.
    first = torch.where(starts, positions, 0).cummax(dim=-1).values
    last = torch.where(ends, positions, length).flip(-1).cummin(dim=-1).values.flip(-1)
    sorted_ranks = (first + last).to(_stat_dtype(values.device)) / 2 + 1
    return torch.empty_like(sorted_ranks).scatter_(-1, order, sorted_ranks)


def _stat_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _correlation(x: Tensor, y: Tensor) -> Tensor:
    """Pearson correlation along the last dim; 0 where either side is constant."""
    x = x - x.mean(-1, keepdim=True)
    y = y - y.mean(-1, keepdim=True)
    scale = (x.square().sum(-1) * y.square().sum(-1)).sqrt()
    value = (x * y).sum(-1) / scale.clamp_min(torch.finfo(scale.dtype).tiny)
    return torch.where(scale > 0, value.clamp(-1, 1), 0.0).float()


def _paired_maps(maps_a: Tensor, maps_b: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(maps_a, Tensor) or not isinstance(maps_b, Tensor):
        raise InputError("both maps must be tensors (..., h, w)")
    if maps_a.shape != maps_b.shape or maps_a.dim() < 2:
        raise InputError(
            f"maps of shape {tuple(maps_a.shape)} and {tuple(maps_b.shape)} cannot be "
            "compared; pass two tensors (..., h, w) of the same shape"
        )
    flats = []
    for side in (maps_a, maps_b):
        if not torch.isfinite(side).all():
            raise InputError("maps contain NaN or Inf values; a map must be finite everywhere")
        flats.append(side.detach().flatten(-2).to(_stat_dtype(side.device)))
    return flats[0], flats[1]


def spearman_correlation(maps_a: Tensor, maps_b: Tensor) -> Tensor:
    """Spearman rank correlation of each pair of maps, over their last two dims.

    Ties get average ranks (as ``scipy.stats.spearmanr``). A constant map has no ranking
    to agree with: its correlation is defined as 0 (scipy gives NaN).

    >>> a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    >>> spearman_correlation(a, torch.tensor([[1.0, 3.0], [2.0, 4.0]]))
    tensor(0.8000)
    """
    flat_a, flat_b = _paired_maps(maps_a, maps_b)
    return _correlation(average_ranks(flat_a), average_ranks(flat_b))


def pearson_correlation(maps_a: Tensor, maps_b: Tensor) -> Tensor:
    """Pearson correlation of each pair of maps over their last two dims (constant: 0)."""
    flat_a, flat_b = _paired_maps(maps_a, maps_b)
    return _correlation(flat_a, flat_b)


@dataclass
class MapComparison:
    """How alike two sets of maps are, one value per map (``(B,)`` or ``(B, T)``).

    Attributes:
        spearman: rank correlation (:func:`spearman_correlation`), in ``[-1, 1]``.
        pearson: linear correlation of the raw values, in ``[-1, 1]``.
        top_overlap: intersection over union of the two maps' top ``top_fraction`` of
            pixels (ties in row-major order), in ``[0, 1]``.
        mean_abs_diff: mean absolute difference after scaling each map to ``[0, 1]``
            (:func:`simexplain.maps.scale_maps`), in ``[0, 1]``.
    """

    spearman: Tensor
    pearson: Tensor
    top_overlap: Tensor
    mean_abs_diff: Tensor


def compare_maps(maps_a: MapsLike, maps_b: MapsLike, *, top_fraction: float = 0.1) -> MapComparison:
    """Rank correlation and simple statistics between two sets of maps of the same shape.

    >>> maps = torch.rand(2, 3, 7, 7)
    >>> same = compare_maps(maps, maps)
    >>> same.spearman.tolist() == [[1.0] * 3] * 2, same.mean_abs_diff.abs().max().item()
    (True, 0.0)
    """
    grid_a, grid_b = _map_batch(maps_a, "maps_a"), _map_batch(maps_b, "maps_b")
    if grid_a.shape != grid_b.shape:
        raise InputError(
            f"maps_a {tuple(grid_a.shape)} and maps_b {tuple(grid_b.shape)} must have the "
            "same (B, T, h, w) shape"
        )
    if not 0 < top_fraction <= 1:
        raise InputError(f"top_fraction must be in (0, 1], got {top_fraction!r}")
    pixels = grid_a.shape[-2] * grid_a.shape[-1]
    top = max(1, math.ceil(top_fraction * pixels))
    in_top_a = _pixel_order_ranks(grid_a.flatten(2)) < top
    in_top_b = _pixel_order_ranks(grid_b.flatten(2)) < top
    shared = (in_top_a & in_top_b).sum(-1).float()
    difference = (scale_maps(grid_a) - scale_maps(grid_b)).abs().mean((-2, -1))
    return MapComparison(
        spearman=_per_map(spearman_correlation(grid_a, grid_b)),
        pearson=_per_map(pearson_correlation(grid_a, grid_b)),
        top_overlap=_per_map(shared / (2 * top - shared)),
        mean_abs_diff=_per_map(difference.float()),
    )


# --------------------------------------------------------------------------- randomisation


def _resettable(module: nn.Module) -> bool:
    has_own = next(module.parameters(recurse=False), None) is not None
    return has_own and callable(getattr(module, "reset_parameters", None))


def _modules_to_reset(model: nn.Module, layers: Union[int, str, Sequence[str]]) -> list[str]:
    """Names of the modules to re-initialise, top (last registered) first."""
    candidates = [name for name, m in model.named_modules() if _resettable(m)]
    if isinstance(layers, bool):
        raise InputError(f"layers must be a positive int or module names, got {layers!r}")
    if isinstance(layers, int):
        if not 1 <= layers <= len(candidates):
            raise InputError(
                f"layers={layers} but the model has {len(candidates)} modules with "
                f"reset_parameters; pass 1..{len(candidates)} or module names"
            )
        return candidates[::-1][:layers]
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names or not all(isinstance(n, str) for n in names):
        raise InputError(f"layers must be a positive int or module names, got {layers!r}")
    chosen = []
    for name in names:
        root = get_layer(model, name)
        inside = [
            f"{name}.{sub}" if sub else name for sub, m in root.named_modules() if _resettable(m)
        ]
        if not inside:
            raise LayerError(
                f"layer {name!r} ({type(root).__name__}) has no parameters that "
                "reset_parameters can re-initialise; choose a layer with weights"
            )
        chosen += [n for n in inside[::-1] if n not in chosen]
    return chosen


def randomize_top_layers(
    model: nn.Module, layers: Union[int, str, Sequence[str]] = 1, *, seed: Optional[int] = 0
) -> nn.Module:
    """A deep copy of ``model`` with its top layers re-initialised; ``model`` is untouched.

    Args:
        model: the trained model.
        layers: an int ``n``: the last ``n`` modules (in registration order, which is
            the forward order for ``nn.Sequential``, torchvision and timm models) that
            own parameters and define ``reset_parameters`` (convolutions, linear and
            normalisation layers, ...); ``n = 1, 2, 3, ...`` randomises cascading from the
            top. Or module names: everything resettable inside them. Parameters of
            modules without ``reset_parameters`` (a ViT's position embedding) are kept.
        seed: seeds the re-initialisation (``None``: the global RNG).

    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    >>> fresh = randomize_top_layers(model, 1)
    >>> torch.equal(fresh[0].weight, model[0].weight), torch.equal(fresh[1].weight, model[1].weight)
    (True, False)
    """
    names = _modules_to_reset(model, layers)
    randomized = copy.deepcopy(model)
    devices = sorted(
        {p.device.index or 0 for p in randomized.parameters() if p.device.type == "cuda"}
    )
    with torch.random.fork_rng(devices=devices, enabled=seed is not None), torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        for name in names:
            randomized.get_submodule(name).reset_parameters()
    return randomized


@dataclass
class SanityResult(MapComparison):
    """:class:`MapComparison` of a model's maps with those of its randomised copy.

    A good method gives low ``spearman`` here: its maps depend on the weights.

    Attributes:
        randomized_layers: the modules re-initialised, top first.
        maps: ``(B, T, h, w)`` maps of the trained model.
        randomized_maps: ``(B, T, h, w)`` maps of the randomised copy.
    """

    randomized_layers: list[str]
    maps: Tensor
    randomized_maps: Tensor


def randomization_sanity(
    model: nn.Module,
    tuples: Sequence[Tensor],
    explain_fn: Callable[[nn.Module, Sequence[Tensor]], MapsLike],
    layers: Union[int, str, Sequence[str]] = 1,
    *,
    seed: Optional[int] = 0,
    top_fraction: float = 0.1,
) -> SanityResult:
    """Model-randomisation sanity check: do the maps change when the weights do?

    Runs ``explain_fn(model, tuples)`` and ``explain_fn(randomized, tuples)``, where
    ``randomized = randomize_top_layers(model, layers, seed=seed)``, and compares the maps
    at the resolution ``explain_fn`` returns (:func:`compare_maps`).

    Args:
        model: the trained model (not modified).
        tuples: the image batches passed to ``explain_fn``.
        explain_fn: any method, ``explain_fn(model, tuples) -> maps`` (see
            :data:`MapsLike`), e.g. ``lambda m, t:
            EmbeddingAttribution(m).attribute_tuples(t).maps``.
        layers: what to re-initialise, as in :func:`randomize_top_layers`.
        seed: seeds the re-initialisation.
        top_fraction: share of pixels compared by ``top_overlap``.
    """
    if not callable(explain_fn):
        raise InputError("explain_fn must be a callable explain_fn(model, tuples) -> maps")
    randomized = randomize_top_layers(model, layers, seed=seed)
    maps = _map_batch(explain_fn(model, tuples), "explain_fn(model, tuples)")
    randomized_maps = _map_batch(explain_fn(randomized, tuples), "explain_fn(randomized, ...)")
    comparison = compare_maps(maps, randomized_maps, top_fraction=top_fraction)
    return SanityResult(
        **vars(comparison),
        randomized_layers=_modules_to_reset(model, layers),
        maps=maps,
        randomized_maps=randomized_maps,
    )
