"""Why sdft.host_memory trims the heap after each step instead of fixing glibc's mmap threshold:
the cost of temporaries when every block of at least the threshold is mapped and unmapped.

    .venv/bin/python benchmarks/bench_heap_threshold.py            # glibc's default (dynamic) threshold
    .venv/bin/python benchmarks/bench_heap_threshold.py 1048576    # mallopt(M_MMAP_THRESHOLD, 1 MiB)

One thread makes and frees two fp32 temporaries of a 1280x1280 weight's size (6.5 MB each), as
an optimizer step does per tensor, 200 times; prints the temporaries' bytes per second.
"""

import ctypes
import sys
import time

import torch

M_MMAP_THRESHOLD = -3   # glibc's malloc.h

if __name__ == "__main__":
    torch.set_num_threads(1)
    if len(sys.argv) > 1:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, int(sys.argv[1]))
    x = torch.randn(1280 * 1280)
    start = time.perf_counter()
    for _ in range(200):
        squared = x * x
        shifted = squared + 1.0
        del squared, shifted
    seconds = time.perf_counter() - start
    threshold = sys.argv[1] if len(sys.argv) > 1 else "default"
    print(f"threshold {threshold}: {200 * 2 * x.numel() * 4 / seconds / 1e9:.2f} GB/s of temporaries ({seconds:.2f} s)")
