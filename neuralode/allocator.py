"""glibc's malloc, set to keep the memory a solver frees for its next step.

A solver step allocates and frees the same tensors step after step: at the server's 256 rows
of ODE-Net state, 2.4 MB each. Under glibc's defaults a block from 128 KB up is a fresh
``mmap`` until frees raise that threshold, and a heap's free memory above a trim threshold is
handed back to the system, so the next step's tensors fault their pages in again, in a worker
thread's heap far more than in the main one. With the settings here, blocks up to 32 MB
(as high as glibc's own threshold ever rises) come from the heaps, and up to 256 MB of free memory at a heap's
top stays there for reuse instead of being trimmed. What that buys the server is measured in
docs/server.md ("Memory the steps give back").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>

OPERATOR_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
"""Environment variables by which an operator sets glibc's thresholds (as do ``glibc.malloc``
entries of ``GLIBC_TUNABLES``): where any is set, their choice stands."""
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> str | None:
    """Set glibc's thresholds for this process (``mallopt``), from now on. Returns None when
    they were set, else why not: not glibc, another allocator preloaded, the operator's own
    settings in the environment, or glibc refusing a value."""
    for value in (mmap_threshold, trim_threshold):
        if not 0 < value < 1 << 31:  # mallopt takes a C int
            raise ValueError(f"a threshold is a positive number of bytes below 2 GiB, got {value}")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "the C library is not glibc"
    preloaded = os.environ.get("LD_PRELOAD", "")
    other = next((name for name in _OTHER_ALLOCATORS if name in preloaded), None)
    if other is not None:
        return f"LD_PRELOAD loads {other}"
    given = [name for name in OPERATOR_SETTINGS if name in os.environ]
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        given.append("GLIBC_TUNABLES")
    if given:
        return f"the environment sets {', '.join(given)}"
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    for option, value in ((_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold)):
        if libc.mallopt(option, value) != 1:  # some builds refuse some thresholds
            return f"glibc refused mallopt({option}, {value})"
    return None
