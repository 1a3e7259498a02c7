"""Memory freed while loading goes back to the OS (glibc's malloc, tuned around the load)."""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterator
from contextlib import contextmanager

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc's malloc.h)
LOAD_MMAP_THRESHOLD = 1 << 20
SERVE_MMAP_THRESHOLD = 32 << 20  # the ceiling of glibc's own adjustment of the threshold (64-bit)


@contextmanager
def returning_freed_memory() -> Iterator[None]:
    """Let memory freed while loading go back to the OS (glibc; elsewhere this does nothing).

    glibc gives blocks above its mmap threshold their own mappings, unmapped when freed, but it raises
    the threshold (up to 32 MB) whenever such a block is freed: the tensor-sized blocks that packing then
    allocates and frees land on the heap, and stay resident once freed. While loading, the threshold is
    held at 1 MB; afterwards it is set where glibc's adjustment would have taken it, and the heap trimmed.
    """
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, LOAD_MMAP_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, SERVE_MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * SERVE_MMAP_THRESHOLD)
        libc.malloc_trim(0)


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the symbols of the running process, its C library included
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "malloc_trim") else None
