"""Handing freed host memory back to the system (glibc's malloc), for training on the CPU.

glibc serves allocations below its mmap threshold from heaps, and a heap returns freed memory to the
system only from its top. The threshold also rises (up to 32 MiB) each time a mapped block is freed,
so the per-tensor temporaries of an optimizer step, allocated and freed parameter by parameter
between longer-lived tensors, stay resident as freed heap memory: issue 26 saw a CPU full fine-tune's
resident memory climb through the first steps and keep creeping. `malloc_trim(0)` releases every free
page of every heap (not only the top); `release_freed()` calls it after each optimizer step. Fixing the
threshold instead (mallopt M_MMAP_THRESHOLD) would map and unmap every large temporary, and the page
faults made temporaries about 7x slower on the development machine (benchmarks/bench_heap_threshold.py),
so it is not done. Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed() -> bool:
    """Give the system back the free pages of the C heaps; True when glibc released any."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
