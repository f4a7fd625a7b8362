"""How many tuples go through the model in one forward pass."""

from __future__ import annotations

import numbers
from typing import Any, Optional, Sequence

from torch import Tensor

from ..errors import InputError

__all__ = ["DEFAULT_CHUNK_SIZE", "CPU_PIXELS_PER_PASS", "default_chunk_size", "chunk_size_for"]

#: The most tuples per forward pass when ``chunk_size`` is not given.
DEFAULT_CHUNK_SIZE = 32

#: On a CPU, the default chunk holds about this many input pixels: six 224 x 224 images.
#: Batches that large keep their activations in cache; whole batches of 224 px images ran up
#: to 1.8x slower per image (``benchmarks/results/bench_chunking.md``).
CPU_PIXELS_PER_PASS = 6 * 224 * 224


def default_chunk_size(slots: Sequence[Tensor], batch: int) -> int:
    """Tuples per forward pass when ``chunk_size`` is not given.

    Off the CPU, up to :data:`DEFAULT_CHUNK_SIZE`. On a CPU, as many tuples as hold about
    :data:`CPU_PIXELS_PER_PASS` input pixels (at least one, at most the same cap). The
    tuples are then spread evenly over the passes: 32 tuples in chunks of at most 24 run
    as 16 + 16, not 24 + 8.
    """
    limit = DEFAULT_CHUNK_SIZE
    first = slots[0]
    if first.device.type == "cpu":
        pixels = len(slots) * first.shape[-2] * first.shape[-1]
        limit = max(1, min(limit, CPU_PIXELS_PER_PASS // max(1, pixels)))
    passes = -(-batch // limit)
    return -(-batch // passes)


def chunk_size_for(slots: Sequence[Tensor], chunk_size: Optional[Any]) -> int:
    """``chunk_size`` checked as a positive whole number, or the default for ``slots``."""
    if chunk_size is None:
        return default_chunk_size(slots, slots[0].shape[0])
    whole = isinstance(chunk_size, numbers.Integral) and not isinstance(chunk_size, bool)
    if not whole or chunk_size < 1:
        raise InputError(
            f"chunk_size must be a positive number of tuples, got {chunk_size!r}; pass a "
            "whole number such as 8, or None for the default"
        )
    return int(chunk_size)
