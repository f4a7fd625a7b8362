"""Facts about a model and leaving it as found: modes, ``requires_grad``, ``.grad``, device;
and whether its layers can be hooked at all (not inside TorchScript)."""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from ..errors import ModelLoadError

__all__ = ["preserved_state", "model_device", "model_dtype", "check_hookable", "EXPORT_RECIPE"]

#: How to save a model so that simexplain can hook its layers, for error messages.
EXPORT_RECIPE = (
    "ep = torch.export.export(model.eval(), (example,), "
    "dynamic_shapes=({0: torch.export.Dim('batch')},)) with an example batch of 2 or more "
    "images, then torch.export.save(ep, 'model.pt2')"
)


def check_hookable(model: nn.Module) -> None:
    """Raise :class:`~simexplain.errors.ModelLoadError` when ``model`` is, or contains, a
    TorchScript module (``torch.jit.script``, ``torch.jit.trace``, ``torch.jit.load``).

    Maps are read from a layer through forward hooks, which TorchScript modules reject
    (or, traced, never call). Only types are inspected: the model is left untouched.
    """
    for name, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule):
            what = "the model is" if not name else f"the model's submodule {name!r} is"
            raise ModelLoadError(
                f"{what} a TorchScript module ({type(module).__name__}), whose layers cannot "
                "be hooked, so simexplain cannot read their maps; pass the eager nn.Module, "
                f"or export it: {EXPORT_RECIPE}, and load it with simexplain's load_model or "
                "pass torch.export.unflatten(ep); or explain it as a black box "
                "(method='sbsm' or 'rise'), which needs no hooks"
            )


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
        if eval_mode and any(training for _, training in modes):
            model.eval()
        yield
    finally:
        for module, training in modes:
            if module.training != training:  # nn.Module.__setattr__ is slow: only changes
                module.training = training
        for p, flag, grad in zip(params, flags, grads):
            if p.requires_grad != flag:
                p.requires_grad_(flag)
            if p.grad is not grad:
                p.grad = grad


@contextmanager
def frozen_norm_statistics(model: nn.Module) -> Iterator[None]:
    """Keep BatchNorm running statistics (and their counters) unchanged inside the block.

    Train-mode BatchNorm still normalises with the batch's own statistics; only the
    running mean, variance and ``num_batches_tracked`` are left as they were.
    """
    saved = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            counter = module.num_batches_tracked
            saved.append((module, module.momentum, None if counter is None else counter.clone()))
            module.momentum = 0.0  # running = (1 - 0) * running + 0 * batch statistic
    try:
        yield
    finally:
        for module, momentum, counter in saved:
            module.momentum = momentum
            if counter is not None:
                module.num_batches_tracked.copy_(counter)


def model_device(model: nn.Module) -> Optional[torch.device]:
    """The device of the model's first parameter (or buffer); ``None`` when it has neither,
    or is not a module (a function, for the black-box methods)."""
    if not isinstance(model, nn.Module):
        return None
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return None


def model_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The dtype of the model's first floating-point parameter (or buffer); ``None`` if none,
    or if it is not a module."""
    if not isinstance(model, nn.Module):
        return None
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def is_wrapper(model: nn.Module) -> bool:
    """Whether ``model`` is ``DataParallel`` or ``DistributedDataParallel`` around
    ``model.module``."""
    return isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel))


def unwrap_data_parallel(model: nn.Module) -> nn.Module:
    """``model.module`` for ``nn.DataParallel``, else ``model``.

    DataParallel runs a replica per GPU, and a hook on the layer would see one replica's
    rows only; explaining the module itself runs every image through one forward pass.
    DistributedDataParallel keeps one replica per process, so it is explained as it is.
    """
    return model.module if isinstance(model, nn.DataParallel) else model
