"""The trainer's memory kept between steps instead of returned to the operating system.

glibc's malloc hands every block above its mmap threshold (128 KiB, raised dynamically to at most 32 MiB) to
``mmap`` and unmaps it when it is freed, so a training step's activations and gradients, freed at the end of
every step, come back on the next one as fresh pages that the kernel must fault in and zero: ~56,000 page
faults a step at the benchmark's 10M-parameter shape, about 9% of the step's CPU time. PyTorch has no caching
allocator for CPU tensors, so :func:`keep_freed_memory` tells malloc to serve such blocks from its heap and
never to trim it: after the first step every allocation reuses memory already mapped. A process that calls it
keeps its peak memory until it exits, which a training process does anyway. Elsewhere than glibc it does
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# The largest value mallopt takes (a C int); blocks above it still go to mmap.
_LIMIT = 2**30


def keep_freed_memory() -> bool:
    """Serve allocations up to 1 GiB from malloc's heap and never trim it; whether malloc accepted it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)  # musl has none
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _LIMIT)) and bool(mallopt(_M_TRIM_THRESHOLD, _LIMIT))
