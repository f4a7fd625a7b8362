"""Whether this process keeps the large blocks it frees, or gives them back to the kernel.

glibc's default settings serve blocks above 32 MiB (and, until its threshold adapts,
smaller ones) with ``mmap`` and unmap them when freed, so every forward pass over a large
batch faults its activations' pages in again, zeroed; jemalloc's defaults do much the same.
There the cheapest CPU passes are small ones. A process that keeps freed memory
(tcmalloc, ``mallopt`` or ``MALLOC_*`` settings, jemalloc without page decay) pays no
faults, and larger passes cost no more there (``benchmarks/results/bench_allocator.md``).
Which of the two a process is cannot be read from any one setting, so it is measured,
once per process: a block larger than glibc's largest ``mmap`` threshold is allocated,
written, freed and allocated again, and the page faults of writing it the second time are
counted.
"""

from __future__ import annotations

import ctypes
import functools

__all__ = ["PROBE_BYTES", "freed_memory_is_retained"]

#: The block the probe allocates twice: above glibc's largest ``mmap`` threshold (32 MiB on
#: 64-bit systems), so that glibc's defaults always give it back.
PROBE_BYTES = 48 << 20


@functools.lru_cache(maxsize=None)
def freed_memory_is_retained() -> bool:
    """True where this process re-uses a freed :data:`PROBE_BYTES` block without page
    faults; False where it faults (glibc's defaults) or where that cannot be measured
    (no ``getrusage``, no C allocator to call)."""
    try:
        import resource

        libc = ctypes.CDLL(None)  # the process's own malloc, an LD_PRELOADed one included
        malloc, free, memset = libc.malloc, libc.free, libc.memset
    except (ImportError, OSError, AttributeError):
        return False
    malloc.restype, malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    free.restype, free.argtypes = None, [ctypes.c_void_p]
    memset.restype = ctypes.c_void_p
    memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]

    def written_block_faults() -> int:
        block = malloc(PROBE_BYTES)
        if not block:
            raise MemoryError
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        memset(block, 0, PROBE_BYTES)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        free(block)
        return faults

    try:
        written_block_faults()
        faults = written_block_faults()
    except MemoryError:
        return False
    pages = PROBE_BYTES // resource.getpagesize()
    # Other threads' faults only add to the count, which errs towards small passes.
    return faults < pages // 4

