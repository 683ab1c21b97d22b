"""The C allocator's settings for a worker that computes on the CPU.

With its defaults, glibc's ``malloc`` serves a request over a threshold (128 KB at first,
then adjusting itself) with a fresh mapping from the kernel, unmapped again on free, and
returns freed memory at the top of its heap to the kernel. A forward with autograd keeps
some 40 tensors of 1–4 MB a layer alive for its backward (about 2 GB for one pass of the
attribution sweep) and frees them all at the end, so each pass got fresh pages, and
touching fresh pages is slow on a VM. With ``keep_freed_memory`` a second round of the
same allocations reuses the pages instead of faulting them in again
(``tests/runtime/test_allocator.py`` counts the faults); the forward and backward with autograd
get faster, a forward without autograd does not change.

What it costs: the process keeps memory it freed (up to ``KEEP`` at the top of its heap)
for itself until it exits, instead of returning it to the system. A worker's peak is
unchanged.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from <malloc.h>
KEEP = (1 << 31) - 1  # free memory kept at the top of the heap: the largest value mallopt takes (an int)
OWN_MAPPING = 32 << 20  # allocations from this size up are their own mappings: glibc's ceiling on 64-bit


def keep_freed_memory() -> bool:
    """Have glibc's ``malloc`` keep up to ``KEEP`` bytes of freed memory for reuse, and
    serve allocations under 32 MB from its heap. Process-wide, for a CPU worker's process.

    Fixing the thresholds turns off glibc's own adjustment of them, which is why both are
    set: with only the trim threshold fixed, everything over 128 KB would be a fresh
    mapping. Returns False, changing nothing, where the C library has no ``mallopt``
    (macOS, Windows) or refuses the values.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, OWN_MAPPING)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP))


def give_back_freed_memory() -> bool:
    """Return the heap's freed pages to the kernel (glibc's ``malloc_trim``): after a load
    that built and dropped transient models, what the process holds is what it keeps.
    Returns False, doing nothing, where the C library has no ``malloc_trim``."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True
