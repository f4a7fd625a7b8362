"""Keeping BatchNorm's running statistics out of a forward pass that trains nothing in them."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

__all__ = ["frozen_norm_statistics"]


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
