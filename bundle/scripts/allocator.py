"""The C library's memory allocator set to keep freed activations for reuse (glibc), instead of unmapping them."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
#: blocks up to this size come from the heap: glibc's largest mmap threshold on 64-bit systems
MMAP_THRESHOLD = 32 * 1024 * 1024
#: free memory at the top of the heap kept rather than returned to the system (the largest value mallopt takes)
TRIM_THRESHOLD = 2**31 - 1


def reuse_freed_memory() -> bool:
    """Has glibc's ``malloc`` serve blocks of up to 32 MiB from its heap and keep freed heap memory (``mallopt``).

    By default glibc maps large blocks afresh and returns freed memory to the system, so a forward pass faults
    many activations' pages in again: about 15,600 page faults per float32 forward of the shipped model on the
    800 x 800 platelet slice, which then took 1.08x the time (2-core Intel Xeon, ``python
    benchmarks/inference_speed.py --part allocator``). The same as the environment variables
    ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``; allocators such as jemalloc or tcmalloc
    (``LD_PRELOAD``) do the same in their own way. Freed memory then stays with the process for its next blocks.
    Prints what it did; does nothing (and returns False) with other C libraries.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None
    if libc is None or not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        print("memory: the C library is not glibc; its allocator is left as it is")
        return False
    done = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    # printed, not logged, as scripts.precision does: the bundle runner's logging config hides INFO
    print(
        f"memory: glibc keeps freed blocks of up to {MMAP_THRESHOLD >> 20} MiB for reuse"
        if done
        else "memory: mallopt failed"
    )
    return done
