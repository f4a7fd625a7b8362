"""How :class:`~simexplain.training.SAMLoss` reads what it is given: its options, pairs' same-class
flags, and how its metric loss is called on tuples of images."""

from __future__ import annotations

import math
import sys
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import InputError
from .map_crops import CROP_MODES, check_crop_threshold
from .masked_pass import MINING_GRADIENTS
from .masking import check_mask_parameters
from .mining_terms import check_direction
from .occurrence_maps import MINING_METHODS

__all__ = ["check_options", "check_map_options", "pair_flags", "is_pml_loss", "tuple_metric"]


def pair_flags(same_class: Any, slot_labels: Optional[Tensor], batch: int) -> Tensor:
    """Pairs' same-class flags ``(B,)`` from ``same_class`` or their slots' labels."""
    if same_class is None:
        if slot_labels is None:
            raise InputError(
                "pairs need same_class= (a bool per pair) or labels=(labels1, labels2)"
            )
        return slot_labels[:, 0] == slot_labels[:, 1]
    flags = torch.as_tensor(same_class)
    if flags.dtype != torch.bool:
        raise InputError(f"same_class must be booleans, got {flags.dtype}")
    flags = flags.reshape(-1)
    if flags.numel() == 1:
        flags = flags.expand(batch)
    if flags.numel() != batch:
        raise InputError(f"same_class has {flags.numel()} entries for {batch} pairs")
    if slot_labels is not None and bool((flags != (slot_labels[:, 0] == slot_labels[:, 1])).any()):
        raise InputError("same_class disagrees with labels; pass one or the other")
    return flags


def is_pml_loss(loss: Any) -> bool:
    """Whether ``loss`` is a pytorch-metric-learning loss (called with labels and tuples)."""
    # A pml loss object implies its module is imported; importing it here would cost
    # seconds on the first call for users of plain losses.
    module = sys.modules.get("pytorch_metric_learning.losses")
    return module is not None and isinstance(loss, module.BaseMetricLossFunction)


def tuple_metric(
    metric_loss: Callable[..., Tensor], positions: Sequence[Tensor], same: Optional[Tensor],
    labels: Optional[Tensor],
) -> Callable[[Tensor], Tensor]:
    """The metric loss of tuples of images as a function of their embeddings ``(N, d)``
    (slot-major, slot ``k`` at rows ``positions[k]``): a pytorch-metric-learning loss
    gets the tuples as ``indices_tuple`` (pairs split by ``same``; a quadruplet as two
    triplets sharing anchor and positive), any other callable one batch per slot, plus
    ``same`` for pairs."""
    count = len(positions)
    if is_pml_loss(metric_loss):
        if count == 2:
            pml_tuple: tuple = (positions[0][same], positions[1][same],
                                positions[0][~same], positions[1][~same])
        elif count == 3:
            pml_tuple = tuple(positions)
        else:
            a, p, n1, n2 = positions
            pml_tuple = (torch.cat([a, a]), torch.cat([p, p]), torch.cat([n1, n2]))
        return lambda embeddings: metric_loss(embeddings, labels, indices_tuple=pml_tuple)

    def per_slot(embeddings: Tensor) -> Tensor:
        slots = list(embeddings.reshape(count, -1, embeddings.shape[-1]).unbind(0))
        return metric_loss(*slots, same) if count == 2 else metric_loss(*slots)

    return per_slot


def check_map_options(augmentation: Any, direction: Any, margin: Any, threshold: Any) -> None:
    """Raise :class:`~simexplain.errors.InputError` for a wrong augmentation, mining
    direction, mining margin or crop threshold."""
    if augmentation not in ("mask", *CROP_MODES):
        raise InputError(
            f"augmentation must be 'mask' (the mining term on masked tuples), 'crop' (the "
            f"metric loss on map-guided crops) or 'random_crop' (its control), got "
            f"{augmentation!r}"
        )
    check_direction(direction, margin)
    check_crop_threshold(threshold)


def check_options(model: Any, metric_loss: Any, gamma: Any, alpha: Any, beta: Any,
                  max_mining_tuples: Any, method: Any, reference: Any,
                  mining_gradient: Any) -> None:
    """Raise :class:`~simexplain.errors.InputError` for a SAMLoss option that is wrong."""
    if mining_gradient not in MINING_GRADIENTS:
        raise InputError(
            f"mining_gradient must be one of {MINING_GRADIENTS} (what the masked pass "
            f"trains), got {mining_gradient!r}"
        )
    if not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma < 0:
        raise InputError(
            f"gamma must be a finite number >= 0 (the weight of the mining term), got {gamma!r}"
        )
    check_mask_parameters(alpha, beta)
    if not callable(metric_loss):
        raise InputError(f"metric_loss must be callable, got {type(metric_loss).__name__}")
    if max_mining_tuples is not None and (
        not isinstance(max_mining_tuples, int) or max_mining_tuples < 1
    ):
        raise InputError(f"max_mining_tuples must be a positive int, got {max_mining_tuples!r}")
    if method not in MINING_METHODS:
        raise InputError(
            f"method must be one of {MINING_METHODS} (the maps that drive the mask), "
            f"got {method!r}"
        )
    if (reference is not None and method not in ("contribution", "psam")) or (
        isinstance(reference, str) and reference != "batch"
    ):
        raise InputError(
            "reference is for method='contribution' or 'psam': embeddings (N, d), images "
            "(N, C, H, W) or 'batch' (the mean of each training batch's normalised embeddings)"
        )
    if isinstance(model, nn.DataParallel):
        raise InputError(
            "SAMLoss does not train through nn.DataParallel: its replicas would each see "
            "part of the batch at the hooked layer. Use DistributedDataParallel (one "
            "process per GPU), or pass model.module to train on one device"
        )
