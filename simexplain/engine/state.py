"""Facts about a model and leaving it as found: modes, ``requires_grad``, ``.grad``, device."""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

__all__ = ["preserved_state", "model_device", "model_dtype"]


@contextmanager
def preserved_state(model: nn.Module, eval_mode: bool = False) -> Iterator[None]:
    """Run a block and restore the model's per-module modes and parameter flags after it.

    With ``eval_mode=True`` the model is put in eval mode for the block. Parameter
    ``.grad`` tensors are restored by reference, so a block that fills them (it should
    not) cannot leak gradients into the user's optimiser step. Restoration also happens
    when the block raises.
    """
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    try:
        if eval_mode:
            model.eval()
        yield
    finally:
        for module, training in modes:
            module.training = training
        for p, flag, grad in zip(params, flags, grads):
            if p.requires_grad != flag:
                p.requires_grad_(flag)
            if p.grad is not grad:
                p.grad = grad


def model_device(model: nn.Module) -> Optional[torch.device]:
    """The device of the model's first parameter (or buffer); ``None`` when it has neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return None


def model_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The dtype of the model's first floating-point parameter (or buffer); ``None`` if none."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return None
