"""Allocator settings for dual runs (glibc).

A dual forward allocates and frees tangent buffers of K times an activation's size many times per
block (tens of MB each at K = 8, batch 8 x 128). glibc serves blocks that large with fresh ``mmap``
pages and returns them when freed, so every buffer is page-faulted and zero-filled again: on this
kind of machine that is 10-20% of a forward-gradient step. :func:`tune` makes glibc serve them from
its heap and keep freed memory there (``M_MMAP_MAX = 0``, a high ``M_TRIM_THRESHOLD``), so the next
buffer of that size reuses warm pages. The cost is that the process keeps its peak heap;
:func:`release` (``malloc_trim``) hands free memory back to the OS.

Applied by the first dual session of the process unless ``FWDLLM_MALLOC=system``; a no-op where the C
library is not glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_STATE = {"tuned": False, "libc": None}


def _libc():
    if _STATE["libc"] is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            lib.mallopt  # noqa: B018 (glibc only)
            lib.malloc_trim  # noqa: B018
            _STATE["libc"] = lib
        except (OSError, AttributeError):
            _STATE["libc"] = False
    return _STATE["libc"]


def tune() -> bool:
    """Keep large freed blocks in the heap (once per process). Returns whether it is in effect."""
    if _STATE["tuned"]:
        return True
    if os.environ.get("FWDLLM_MALLOC", "").lower() == "system":
        return False
    lib = _libc()
    if not lib:
        return False
    ok = lib.mallopt(_M_MMAP_MAX, 0) == 1 and lib.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1
    _STATE["tuned"] = ok
    return ok


def release() -> None:
    """Return the heap's free memory to the OS (malloc_trim(0))."""
    lib = _libc()
    if lib:
        lib.malloc_trim(0)
