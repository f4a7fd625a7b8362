"""Faithfulness: delete (or reveal) pixels in the order a map ranks them, track the similarity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.embeddings import finite_embeddings, run_model
from ..engine.inputs import check_tuple_inputs
from ..engine.state import preserved_state
from ..errors import InputError
from ._baselines import baseline_images
from ._maps import MapsLike, at_size, map_batch, pixel_order_ranks, random_tie_ranks, split_ties

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


def _embed(model: nn.Module, images: Tensor) -> Tensor:
    """L2-normalised embeddings ``(N, d)``."""
    problem = (
        "the model returned NaN or Inf embeddings for perturbed images; check the baseline "
        "values and the model's input range"
    )
    embeddings = finite_embeddings(run_model(model, images), images.shape[0], problem)
    return F.normalize(embeddings, dim=-1)


def _perturbed_embeddings(
    model: nn.Module,
    images: Tensor,
    base: Tensor,
    ranks: Tensor,
    rows: Tensor,
    items: Tensor,
    pixel_counts: Tensor,
    insertion: bool,
    batch_size: int,
) -> Tensor:
    """Embeddings ``(N, d)`` of ``N`` perturbed images, in forwards of ``batch_size``.

    Image ``k`` is ``images[items[k]]`` with the ``pixel_counts[k]`` pixels of lowest
    ``ranks[rows[k]]`` perturbed.
    """
    _, _, height, width = images.shape
    parts = []
    for start in range(0, items.numel(), batch_size):
        index = slice(start, start + batch_size)
        item = items[index]
        # A pixel is perturbed at a step when its rank is below that step's pixel count.
        changed = ranks[rows[index]] < pixel_counts[index, None]
        keep = changed if insertion else ~changed
        keep = keep.view(-1, 1, height, width)
        parts.append(_embed(model, torch.where(keep, images[item], base[item])))
    return torch.cat(parts)


def _draw_embeddings(
    model: nn.Module,
    images: Tensor,
    base: Tensor,
    flat_maps: Tensor,
    split: Tensor,
    counts: Tensor,
    draws: int,
    generator: torch.Generator,
    insertion: bool,
    batch_size: int,
) -> Tensor:
    """Embeddings ``(D, S + 1, B, d)`` of every step of ``draws`` pixel orders.

    Draw 0 embeds every (step, image), step by step; the maps with ties that ``split``
    a step rank their tied pixels at random. Draws ``1 .. D - 1`` re-draw those maps'
    tie orders and embed again only the split (step, image) pairs: elsewhere the
    perturbed pixels, hence the embeddings, are the same in every draw.
    """
    steps, batch = split.shape
    device = images.device
    ranks = pixel_order_ranks(flat_maps)
    redrawn = split.any(0).nonzero().flatten()
    if redrawn.numel():
        ranks[redrawn] = random_tie_ranks(flat_maps[redrawn], generator)
    grid_steps, grid_items = torch.meshgrid(
        torch.arange(steps, device=device), torch.arange(batch, device=device), indexing="ij"
    )
    rows, items, pixel_counts = (
        [grid_items.flatten()],
        [grid_items.flatten()],
        [counts[grid_steps.flatten()]],
    )
    step_index, item_index = split.nonzero(as_tuple=True)
    slot_of = torch.full((batch,), -1, dtype=torch.long, device=device)
    slot_of[redrawn] = torch.arange(redrawn.numel(), device=device)
    all_ranks = [ranks]
    for draw in range(1, draws):
        all_ranks.append(random_tie_ranks(flat_maps[redrawn], generator))
        rows.append(batch + (draw - 1) * redrawn.numel() + slot_of[item_index])
        items.append(item_index)
        pixel_counts.append(counts[step_index])
    embeddings = _perturbed_embeddings(
        model,
        images,
        base,
        torch.cat(all_ranks),
        torch.cat(rows),
        torch.cat(items),
        torch.cat(pixel_counts),
        insertion,
        batch_size,
    )
    first = embeddings[: steps * batch].view(steps, batch, -1)
    out = first.unsqueeze(0).repeat(draws, 1, 1, 1)
    per_draw = step_index.numel()
    for draw in range(1, draws):
        start = steps * batch + (draw - 1) * per_draw
        out[draw, step_index, item_index] = embeddings[start : start + per_draw]
    return out


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
    ties: str = "random",
    tie_draws: int = 3,
    seed: int = 0,
) -> PerturbationCurve:
    """Delete or reveal pixels in the order the maps rank them and track the similarity.

    Each image's map is upsampled to the image and its pixels ranked, highest first. Tied
    pixels (the zero region of a ReLU'd map, an all-constant map) are ranked in a random
    order, and the curve is the mean over ``tie_draws`` such orders, drawn from a
    generator seeded with ``seed``: so a map that leaves many pixels unranked scores as
    an uninformed order would on those pixels, not by where they sit in raster order, and
    its AUC compares with that of a fully ranked (signed) map. Only the steps whose pixel
    count splits a group of tied values depend on the draw; they alone are embedded again
    for each draw, and a map without ties is evaluated once, as with a single draw.

    At step ``s`` of ``steps`` the top ``round(s / steps * H * W)`` pixels are perturbed in
    every channel:

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
        ties: ``"random"`` (default): tied pixels in a random order, averaged over
            ``tie_draws`` draws; ``"row-major"``: tied pixels in row-major order, one
            draw (the earlier behaviour; an all-zero map then perturbs from the top-left
            corner).
        tie_draws: number of random tie orders averaged, for maps with ties. Each draw
            costs the ``steps + 1`` forwards of that image again.
        seed: seed of the ``torch.Generator`` (on the CPU) that draws the tie orders;
            the same seed and inputs give the same result.

    Returns:
        A :class:`PerturbationCurve`.

    >>> model = torch.nn.Flatten()                    # the embedding is the image itself
    >>> x1 = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    >>> x2 = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]]])
    >>> maps = torch.tensor([[4.0, 3.0], [2.0, 1.0]]).expand(1, 2, 2, 2)  # top row first
    >>> result = perturbation_curve(model, (x1, x2), maps, steps=2, baseline=0.0,
    ...                             perturb="all")
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
    _check_choice("ties", ties, ("random", "row-major"))
    _check_positive(steps=steps, batch_size=batch_size, tie_draws=tie_draws)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an integer, got {seed!r}")
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
        bases = {slot: baseline_images(images[slot], baseline, blur_sigma) for slot in chosen}
    flat_maps = {slot: grid[:, slot].flatten(1) for slot in chosen}
    if ties == "random":
        split = {slot: split_ties(flat_maps[slot], counts) for slot in chosen}
    else:
        split = {
            slot: torch.zeros(steps + 1, batch, dtype=torch.bool, device=device) for slot in chosen
        }
    # One draw when no step of any map depends on the tie order (e.g. maps without ties).
    draws = tie_draws if any(bool(s.any()) for s in split.values()) else 1
    generator = torch.Generator().manual_seed(seed)
    with preserved_state(model, eval_mode=True), torch.no_grad():
        originals = [_embed(model, x) for x in images]
        perturbed = {
            slot: _draw_embeddings(
                model,
                images[slot],
                bases[slot],
                flat_maps[slot],
                split[slot],
                counts,
                draws,
                generator,
                mode == "insertion",
                batch_size,
            )
            for slot in chosen
        }
        shape = (draws, steps + 1, batch)
        intact = [f.expand(*shape, -1) for f in originals]
        groups = [[slot] for slot in chosen] if perturb == "each" else [list(chosen)]
        curves = []
        for group in groups:
            slot_embeddings = [
                perturbed[i] if i in group else intact[i] for i in range(len(intact))
            ]
            values = _similarity_of(similarity, slot_embeddings, shape)
            # The mean over the draws where the tie order matters, else the one draw.
            varies = torch.stack([split[i] for i in group]).any(0)
            curves.append(torch.where(varies, values.mean(0), values[0]).t())
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
