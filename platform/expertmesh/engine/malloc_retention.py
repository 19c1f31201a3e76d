"""Keep freed memory in the process, so a step's big activations do not page-fault anew.

glibc's malloc serves blocks over 32 MB (and, by its dynamic threshold, many smaller
ones) with a fresh mmap, and unmaps them on free; it also trims a heap's free top.
Every prefill step then touches hundreds of MB of new pages, each a kernel fault that
zeroes 4 KB: measured here on a 4096-token fp32 prefill of the small qwen2_moe
checkpoint, 240-310 thousand faults and 0.6-1.2 s of system time, a third of the
step. With mmap off and trimming off, freed blocks stay on malloc's free lists and the
next step reuses them: no faults after the first step, as under tcmalloc or jemalloc,
which vLLM's CPU backend preloads for the same reason. The cost is that the process
keeps its high-water mark. Set EXPERTMESH_RETAIN_FREED_MEMORY=0 to leave malloc alone.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

log = logging.getLogger(__name__)

DISABLE_ENV = "EXPERTMESH_RETAIN_FREED_MEMORY"
_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1  # mallopt takes an int


@functools.cache
def retain_freed_memory() -> bool:
    """Tell glibc's malloc never to return freed memory to the OS (process-wide, once).

    Returns whether it took effect: False off glibc, or when disabled by the environment.
    """
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done = mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1 and mallopt(_M_MMAP_MAX, 0) == 1
    if not done:
        log.warning("mallopt refused; freed memory goes back to the OS (steps page-fault more)")
    return done
