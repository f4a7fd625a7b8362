"""How :class:`~simexplain.training.SAMLoss` reads what it is given: pairs' same-class
flags, and whether a metric loss is pytorch-metric-learning's."""

from __future__ import annotations

import sys
from typing import Any, Optional

import torch
from torch import Tensor

from ..errors import InputError

__all__ = ["pair_flags", "is_pml_loss"]


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
