"""Host (CPU) memory glibc keeps after torch frees it, and the switch that gives it back (train.return_freed_memory).

What the RSS beyond live tensors is (bench/results/rss_allocator.md; demo model, seq 2048): glibc's malloc raises
its mmap threshold up to 32 MiB after the first large free, so the 1-32 MiB tensors of a step (activations,
gradients, loading transients) come from heap arenas and stay there once freed, ready for reuse: RSS grows ~3.3x the
live-tensor peak. That retention is also why steps are fast: reused pages need no new page faults. With the
threshold fixed at 128 KiB (and the heap trimmed above 128 KiB) freed tensors go back to the OS: RSS grows 1.8x
the live peak, at ~0.7x the tokens/s on the CPU (every large tensor is a fresh mapping whose pages fault in again).
Thresholds of 4 MiB or more keep the speed and most of the growth. So it is a switch, off by default.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
THRESHOLD = 128 << 10  # bytes: glibc's own starting mmap threshold, kept fixed instead of rising to 32 MiB


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None  # glibc, not musl
    except OSError:
        return None


def return_freed_memory() -> bool:
    """From now on, freed blocks over 128 KiB go back to the OS (what MALLOC_MMAP_THRESHOLD_=131072
    MALLOC_TRIM_THRESHOLD_=131072 do at process start), and what is free now is given back. False where the C
    library is not glibc (nothing changed)."""
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, THRESHOLD) == 1
    libc.malloc_trim(0)
    return ok
