"""Checks of what a call is given: a tuple of image batches, and extra forward arguments."""

from __future__ import annotations

from typing import Any, Sequence, Union

import torch
from torch import Tensor

from ..errors import InputError

__all__ = [
    "TensorOrTuple",
    "check_tuple_inputs",
    "all_finite",
    "as_forward_args",
    "is_per_tuple",
    "tuple_forward_args",
    "integer_images_error",
]

TensorOrTuple = Union[Tensor, Sequence[Tensor]]


def is_per_tuple(arg: Any, batch: int) -> bool:
    """Whether a forward argument is per tuple: a tensor ``(B, ...)`` (captum's convention)."""
    return isinstance(arg, Tensor) and arg.dim() > 0 and arg.shape[0] == batch


def tuple_forward_args(args: tuple, batch: int, start: int, stop: int, num_slots: int) -> tuple:
    """Per-tuple tensor arguments (B, ...) cut to a chunk and repeated for every slot."""
    return tuple(
        torch.cat([a[start:stop]] * num_slots) if is_per_tuple(a, batch) else a for a in args
    )


def as_forward_args(args: Any) -> tuple:
    """``additional_forward_args`` as a tuple of positional arguments: ``None`` is none, a
    tuple or list is spread, anything else is one argument (captum's convention)."""
    if args is None:
        return ()
    return tuple(args) if isinstance(args, (tuple, list)) else (args,)


def check_tuple_inputs(inputs: TensorOrTuple) -> list[Tensor]:
    """The image batches of a tuple, checked: 2 to 4 float tensors ``(B, C, H, W)`` of one
    shape, device and dtype, finite and not empty."""
    if isinstance(inputs, Tensor) or not isinstance(inputs, (tuple, list)):
        raise InputError(
            "inputs must be a tuple of 2, 3 or 4 image batches (pair, triplet or "
            f"quadruplet), each (B, C, H, W); got {type(inputs).__name__}. "
            "E.g. attribute((anchor, positive, negative))"
        )
    slots = list(inputs)
    if not 2 <= len(slots) <= 4:
        raise InputError(
            f"inputs has {len(slots)} image batches; pass 2 (pair), 3 (triplet: anchor, "
            "positive, negative) or 4 (quadruplet: anchor, positive, negative1, negative2)"
        )
    for i, x in enumerate(slots):
        if not isinstance(x, Tensor):
            raise InputError(f"inputs[{i}] is {type(x).__name__}; expected a tensor (B, C, H, W)")
        if x.dim() != 4:
            raise InputError(
                f"inputs[{i}] has shape {tuple(x.shape)}; each slot must be a 4-D batch "
                "(B, C, H, W). Add a batch dimension with x.unsqueeze(0) for one image"
            )
        if not x.is_floating_point():
            raise integer_images_error(f"inputs[{i}]", x.dtype)
    first = slots[0]
    for i, x in enumerate(slots[1:], start=1):
        if x.shape[0] != first.shape[0]:
            raise InputError(
                f"inputs[{i}] has {x.shape[0]} images but inputs[0] has {first.shape[0]}; "
                "every slot must hold the same number of tuples"
            )
        if x.shape[1:] != first.shape[1:]:
            raise InputError(
                f"inputs[{i}] has image shape {tuple(x.shape[1:])} but inputs[0] has "
                f"{tuple(first.shape[1:])}; resize all images of a tuple to one size"
            )
        if x.device != first.device or x.dtype != first.dtype:
            raise InputError(
                f"inputs[{i}] is {x.dtype} on {x.device} but inputs[0] is {first.dtype} on "
                f"{first.device}; move all slots to one device and dtype"
            )
    if first.shape[0] == 0:
        raise InputError("inputs hold no images (batch size 0)")
    for i, x in enumerate(slots):
        if not all_finite(x):
            raise InputError(f"inputs[{i}] contains NaN or Inf values; clean the images first")
    return slots


def integer_images_error(name: str, dtype: torch.dtype) -> InputError:
    """The error for images given as integers (``uint8`` pixels 0-255, ...): models take
    float images, normalised as they were trained."""
    return InputError(
        f"{name} has dtype {dtype}; convert images to float and normalise them as the "
        "model expects: e.g. x.float() / 255 for 0-255 pixels, then subtract the model's "
        "mean and divide by its std (or give explain image files or PIL images, which it "
        "preprocesses as the model's data config says)"
    )


def all_finite(tensor: Tensor) -> bool:
    """Whether ``tensor`` holds no NaN or Inf.

    A sum is several times faster than ``isfinite(...).all()`` on large inputs and is
    non-finite whenever an element is; only then (or on overflow) the exact test decides.
    """
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())
