"""Keep freed memory in the process for reuse: glibc ``malloc`` thresholds for CPU labelling.

A network labelling a batch on a CPU allocates and frees the same large
activation tensors (megabytes each) on every call. With glibc's defaults a
block above the ``mmap`` threshold is mapped fresh and unmapped on free, and
free memory at the top of the heap above the trim threshold is handed back to
the OS; either way the next call touches new pages and pays a page fault per
4 KiB. That cost grows with the tensors, so it falls on a batched call more than
on one image at a time (``benchmarks/epld_speed.py`` prints both).

:func:`keep_freed_memory` sets ``M_MMAP_THRESHOLD`` (to glibc's maximum,
32 MiB, or ``mib`` if smaller) and ``M_TRIM_THRESHOLD`` (``mib``) with
``mallopt(3)``: blocks up to the mmap threshold come from the heap, and up to
``mib`` MiB of freed heap stays mapped for the next call. The price is that
the process's resident memory does not shrink below its peak by more than that
after a large call. It is a process-wide setting (the labelling actors set it
once, ``ray_data.keep_freed_memory_mib``); on a C library other than glibc it
does nothing and says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: larger values are refused
MAX_MIB = (2**31 - 1) >> 20  # mallopt's value is a C int of bytes


def keep_freed_memory(mib: int) -> bool:
    """Let this process keep up to ``mib`` MiB of freed heap for reuse (module docstring).

    Returns ``True`` when glibc accepted both settings, ``False`` when ``mib``
    is 0 (glibc's defaults stay) or the C library has no ``mallopt``.
    """
    if not 0 <= mib <= MAX_MIB:
        raise ValueError(f"keep_freed_memory: mib must be in 0..{MAX_MIB} (mallopt takes an int of bytes), got {mib}")
    if mib == 0 or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt thresholds)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    size = mib << 20
    return mallopt(M_MMAP_THRESHOLD, min(size, MMAP_THRESHOLD_MAX)) == 1 and mallopt(M_TRIM_THRESHOLD, size) == 1


__all__ = ["keep_freed_memory"]
