"""What a tuple is: its kinds, sizes and slot roles, and labels checked against the roles.

A pair is same- or different-class; a triplet is (anchor, positive with the anchor's
label, negative with another label); a quadruplet adds a second negative. Labels come
either per tuple slot (:func:`check_labels`) or as a batch with index tuples, as
pytorch-metric-learning's miners return them (:func:`check_index_tuples`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from ..errors import InputError

__all__ = [
    "TUPLE_SIZES",
    "ROLES",
    "size_kind",
    "tuple_kind",
    "check_target",
    "check_labels",
    "check_index_tuples",
]

#: Tuple kinds and the number of images each one has.
TUPLE_SIZES: dict[str, int] = {
    "same_pair": 2,
    "different_pair": 2,
    "triplet": 3,
    "quadruplet": 4,
}

#: The role of each slot, by kind (``"pair"``: a batch mixing same- and different-class).
ROLES: dict[str, tuple[str, ...]] = {
    "same_pair": ("image 1", "image 2"),
    "different_pair": ("image 1", "image 2"),
    "pair": ("image 1", "image 2"),
    "triplet": ("anchor", "positive", "negative"),
    "quadruplet": ("anchor", "positive", "negative 1", "negative 2"),
}

_SLOT_NAMES = ("anchor", "positive", "negative", "second negative")


def size_kind(num_slots: int) -> str:
    """The kind a tuple of ``num_slots`` images is when nothing else is known about it.

    >>> size_kind(2), size_kind(3), size_kind(4)
    ('pair', 'triplet', 'quadruplet')
    """
    try:
        return {2: "pair", 3: "triplet", 4: "quadruplet"}[num_slots]
    except KeyError:
        raise InputError(f"tuples have 2, 3 or 4 images; got {num_slots}") from None


def tuple_kind(num_slots: int, same_class: Optional[Tensor], custom: bool) -> str:
    """Name the kind of tuple explained from its size and, for pairs, ``same_class``."""
    if custom:
        return "custom"
    if num_slots == 2:
        if same_class is None:
            return "pair"
        if bool(same_class.all()):
            return "same_pair"
        return "different_pair" if not bool(same_class.any()) else "pair"
    return "triplet" if num_slots == 3 else "quadruplet"


def check_target(target: Any, num_slots: int, batch: int) -> Optional[Tensor]:
    """Pairs' same-class flags ``(B,)`` from ``target``; ``None`` for larger tuples."""
    if num_slots != 2:
        if target is not None:
            raise InputError(
                f"target is only used for pairs (same-class or not); a {num_slots}-image "
                "tuple has its roles fixed by position, so pass target=None"
            )
        return None
    if target is None:
        raise InputError(
            "pairs need target: a bool tensor (B,) saying whether each pair is same-class "
            "(True) or different-class (False); or pass weight_fn= for another criterion"
        )
    try:
        flags = torch.as_tensor(target).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"target must hold booleans (same-class or not), got {target!r}") from None
    if flags.dtype != torch.bool:
        if flags.is_floating_point() or not bool(((flags == 0) | (flags == 1)).all()):
            raise InputError(f"target must hold booleans (same-class or not), got {target!r}")
        flags = flags.bool()
    if flags.numel() == 1:
        flags = flags.expand(batch)
    if flags.numel() != batch:
        raise InputError(
            f"target has {flags.numel()} entries for {batch} pairs; pass one bool per pair"
        )
    return flags


def check_labels(labels: Any, batch: int, count: int) -> Tensor:
    """Validate tuple labels ``(B, T)`` against the roles their positions imply.

    Two labels make a pair (same- or different-class); three a triplet (anchor,
    positive with the anchor's label, negative with another); four a quadruplet
    (anchor, positive, two negatives). Returns the labels as a ``(B, T)`` tensor.

    Example:
        >>> check_labels([[0, 0, 1], [2, 2, 0]], batch=2, count=3).shape
        torch.Size([2, 3])
    """
    try:
        labels = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(
            f"labels must be integer class labels, one per image, got {labels!r}"
        ) from None
    if labels.dim() == 1:
        labels = labels.unsqueeze(0).expand(batch, -1)
    if labels.dim() != 2 or tuple(labels.shape) != (batch, count):
        raise InputError(
            f"labels has shape {tuple(labels.shape)} but the images are {batch} tuple(s) of "
            f"{count}; pass labels of shape ({count},) or ({batch}, {count}), one per image"
        )
    if count >= 3:
        in_tuple = (lambda row: f" in tuple {row}") if batch > 1 else (lambda row: "")
        _check_roles(
            labels.unbind(1),
            lambda row, slot: f"labels[{row}, {slot}] (the {_SLOT_NAMES[slot]}{in_tuple(row)})",
        )
    return labels


def check_index_tuples(
    labels: Tensor, indices_tuple: Sequence[Tensor], kind: str = "auto"
) -> tuple[Tensor, ...]:
    """Validate index tuples into a batch against its ``labels`` ``(N,)``.

    ``indices_tuple`` is ``(a, p, n)`` (triplets), ``(a1, p, a2, n)`` (pytorch-metric-
    learning's positive and negative pairs) or, with ``kind="quadruplet"``,
    ``(a, p, n1, n2)``. Returns the indices as long tensors on ``labels``' device.

    Example:
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> a, p, n = check_index_tuples(labels, (torch.tensor([0]), torch.tensor([1]),
        ...                                       torch.tensor([2])))
        >>> int(n)
        2
    """
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        what = type(indices_tuple).__name__
        if isinstance(indices_tuple, (tuple, list)):
            what += f" of length {len(indices_tuple)}"
        raise InputError(
            "indices_tuple must be (anchors, positives, negatives) or pytorch-metric-"
            f"learning's pair form (anchors1, positives, anchors2, negatives); got {what}"
        )
    if kind not in ("auto", "quadruplet"):
        raise InputError(f"kind must be 'auto' or 'quadruplet', got {kind!r}")
    count = labels.shape[0]
    indices = []
    for k, index in enumerate(indices_tuple):
        index = torch.as_tensor(index, device=labels.device)
        if index.dim() != 1 or index.is_floating_point() or index.dtype == torch.bool:
            raise InputError(
                f"indices_tuple[{k}] must be a 1-D integer tensor of batch positions, got "
                f"{index.dtype} of shape {tuple(index.shape)}"
            )
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= count):
            raise InputError(
                f"indices_tuple[{k}] holds positions outside the batch of {count} images"
            )
        indices.append(index.long())
    if len(indices) == 4 and kind == "auto":
        _check_equal_lengths(indices[:2], "the positive pairs (a1, p)")
        _check_equal_lengths(indices[2:], "the negative pairs (a2, n)")
        if bool((labels[indices[0]] != labels[indices[1]]).any()):
            row = int((labels[indices[0]] != labels[indices[1]]).nonzero()[0])
            raise InputError(
                f"positive pair {row} joins images of labels "
                f"{int(labels[indices[0][row]])} and {int(labels[indices[1][row]])}; "
                "positive pairs (a1, p) must share a label"
            )
        if bool((labels[indices[2]] == labels[indices[3]]).any()):
            row = int((labels[indices[2]] == labels[indices[3]]).nonzero()[0])
            raise InputError(
                f"negative pair {row} joins two images of label "
                f"{int(labels[indices[2][row]])}; negative pairs (a2, n) must differ in label"
            )
        return tuple(indices)
    _check_equal_lengths(indices, "the tuples")
    _check_roles(
        [labels[i] for i in indices],
        lambda row, slot: f"the label of the {_SLOT_NAMES[slot]} of index tuple {row}",
    )
    return tuple(indices)


def _check_equal_lengths(indices: Sequence[Tensor], what: str) -> None:
    if len({int(i.numel()) for i in indices}) > 1:
        raise InputError(
            f"index tensors of {what} have different lengths "
            f"{[int(i.numel()) for i in indices]}; each position must form one tuple"
        )


def _check_roles(columns: Sequence[Tensor], describe: Callable[[int, int], str]) -> None:
    """Raise on the first tuple whose positive differs from, or negative equals, the anchor.

    ``columns`` holds one label tensor per slot; ``describe(row, slot)`` names a label.
    """
    kind = "triplet" if len(columns) == 3 else "quadruplet"
    anchor = columns[0]
    bad_positive = columns[1] != anchor
    if bool(bad_positive.any()):
        row = int(bad_positive.nonzero()[0])
        raise InputError(
            f"{describe(row, 1)} is {int(columns[1][row])} but the anchor's label is "
            f"{int(anchor[row])}; a {kind} is (anchor, positive with the anchor's label, "
            "negative(s) with other labels)"
        )
    for slot in range(2, len(columns)):
        bad_negative = columns[slot] == anchor
        if bool(bad_negative.any()):
            row = int(bad_negative.nonzero()[0])
            raise InputError(
                f"{describe(row, slot)} equals the anchor's label {int(anchor[row])}; "
                "negatives must have a label different from the anchor's"
            )
