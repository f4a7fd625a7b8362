"""How many tuples go through the model in one forward pass."""

from __future__ import annotations

import numbers
from typing import Any, Optional, Sequence

from torch import Tensor

from ..errors import InputError
from ._allocator import freed_memory_is_retained

__all__ = ["DEFAULT_CHUNK_SIZE", "CPU_PIXELS_PER_PASS", "CPU_PIXELS_PER_PASS_RETAINED",
           "cpu_pixels_per_pass", "cpu_items_per_pass", "default_chunk_size",
           "chunk_size_for"]

#: The most tuples per forward pass when ``chunk_size`` is not given.
DEFAULT_CHUNK_SIZE = 32

#: On a CPU whose process gives large freed blocks back to the kernel (glibc's defaults),
#: the default chunk holds about this many input pixels: six 224 x 224 images. A larger
#: pass faults more of its activations in again: 24 ResNet-50 images took 1.57x as long in
#: one pass as in passes of six (``benchmarks/results/bench_allocator.md``).
CPU_PIXELS_PER_PASS = 6 * 224 * 224

#: The same where the process keeps what it frees (tcmalloc, ``mallopt``, ``MALLOC_*``):
#: 24 images of 224 px. There the two pass sizes cost the same to within 1-6% (the same
#: file), and eight triplets go through in one pass, as captum's ``LayerGradCam`` runs
#: them, while memory stays bounded.
CPU_PIXELS_PER_PASS_RETAINED = 24 * 224 * 224


def cpu_pixels_per_pass(retained: Optional[bool] = None) -> int:
    """Input pixels per CPU forward pass: :data:`CPU_PIXELS_PER_PASS_RETAINED` where this
    process keeps freed memory (``retained``; default: measured once per process, see
    :func:`~simexplain.engine._allocator.freed_memory_is_retained`), else
    :data:`CPU_PIXELS_PER_PASS`."""
    if retained is None:
        retained = freed_memory_is_retained()
    return CPU_PIXELS_PER_PASS_RETAINED if retained else CPU_PIXELS_PER_PASS


def cpu_items_per_pass(pixels: int, cap: int, count: Optional[int] = None,
                       retained: Optional[bool] = None) -> int:
    """How many inputs of ``pixels`` pixels each go through one CPU pass, at most ``cap``:
    as many as :func:`cpu_pixels_per_pass` holds. The process is probed only when
    ``count`` inputs (default ``cap``) would not fit in one pass of six 224 px images."""
    pixels = max(1, pixels)
    small = max(1, min(cap, CPU_PIXELS_PER_PASS // pixels))
    if (cap if count is None else count) <= small:
        return small
    return max(1, min(cap, cpu_pixels_per_pass(retained) // pixels))


def default_chunk_size(slots: Sequence[Tensor], batch: int,
                       retained: Optional[bool] = None) -> int:
    """Tuples per forward pass when ``chunk_size`` is not given.

    Off the CPU, up to :data:`DEFAULT_CHUNK_SIZE`. On a CPU, as many tuples as hold about
    :func:`cpu_pixels_per_pass` input pixels (at least one, at most the same cap): six
    224 px images, or 24 where the process keeps freed memory (``retained``; measured only
    when six would need more than one pass). The tuples are then spread evenly over the
    passes: 32 tuples in chunks of at most 24 run as 16 + 16, not 24 + 8.
    """
    limit = DEFAULT_CHUNK_SIZE
    first = slots[0]
    if first.device.type == "cpu":
        pixels = len(slots) * first.shape[-2] * first.shape[-1]
        limit = cpu_items_per_pass(pixels, DEFAULT_CHUNK_SIZE, batch, retained)
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
