"""The C allocator's settings for a bergson process on Linux (glibc): the bottom floor,
importing nothing of ours.

By default glibc hands allocations above its mmap threshold (128 KiB, raised as it sees large
frees, up to 32 MiB) their own ``mmap``, and gives freed memory at the top of the heap back to
the kernel beyond a trim threshold. A CPU forward and backward allocates and frees tensors of a
few to tens of MiB at every operation, so the kernel keeps mapping, zeroing and unmapping the
same pages: 14 s of kernel time in a 42 to 45 s ``bergson magic`` of the example fine-tune.
With a fixed 32 MiB threshold and no trimming, freed tensors are reused from pages already
mapped (what a preloaded jemalloc or tcmalloc does): 34 to 38 s, 4 to 6 s of it in the kernel
(docs/benchmarks/performance.md). The cost: memory freed after a peak stays with the process
until it ends.

The ``bergson`` program applies this at start; ``BERGSON_MALLOC=system`` leaves glibc's
defaults, and so does any ``MALLOC_*`` setting or ``LD_PRELOAD`` of the caller's own (their
choice wins). Python users may call :func:`keep_freed_memory` themselves.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MMAP_THRESHOLD = 32 << 20
"""Allocations below this come from the heap (glibc's largest mmap threshold on 64-bit)."""
TRIM_THRESHOLD = -1
"""Free memory at the top of the heap beyond which glibc returns it to the system: -1, never."""
TOP_PAD = 64 << 20
"""Extra heap obtained at each growth, so that a growing heap asks the kernel less often."""

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's malloc.h
_applied = False


def keep_freed_memory() -> bool:
    """Keep freed memory in glibc's heap for reuse (see the module's doc); True when applied
    (now or earlier), False where it does not apply: not Linux with glibc, or the caller chose
    its own allocator settings."""
    global _applied
    if _applied:
        return True
    why = _not_applicable()
    if why:
        logger.debug("allocator settings left as they are: %s", why)
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (_M_TOP_PAD, TOP_PAD),
    )
    _applied = all(mallopt(option, value) == 1 for option, value in settings)
    logger.debug("glibc malloc: freed memory kept for reuse (%s)", "applied" if _applied else "refused")
    return _applied


@functools.cache
def _glibc() -> bool:
    try:
        return sys.platform == "linux" and (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError):  # the name is unknown to this C library
        return False


def _not_applicable() -> str:
    if os.environ.get("BERGSON_MALLOC", "").lower() == "system":
        return "BERGSON_MALLOC=system"
    if not _glibc():
        return "not Linux with glibc"
    own = [k for k in os.environ if k.startswith("MALLOC_")] + (
        ["LD_PRELOAD"] if os.environ.get("LD_PRELOAD") else []
    )
    if own:
        return f"the environment sets {', '.join(sorted(own))}"
    return ""


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


@functools.cache
def _mallinfo2() -> Any:
    """glibc's ``mallinfo2`` (found once), None without glibc 2.33+."""
    info = getattr(ctypes.CDLL(None), "mallinfo2", None) if _glibc() else None
    if info is not None:
        info.restype = _MallInfo2
    return info


def heap_bytes() -> int | None:
    """Bytes that glibc's malloc has handed out and not taken back (``mallinfo2``: the heap's
    chunks in use plus mmapped ones), which is where CPU tensors live; None without glibc 2.33+."""
    info = _mallinfo2()
    if info is None:
        return None
    m = info()
    return int(m.uordblks + m.hblkhd)


def allocated_bytes(device: torch.device) -> int | None:
    """Bytes of memory in use on ``device`` (CUDA: torch's allocator; CPU: :func:`heap_bytes`),
    None where it cannot be known."""
    if device.type == "cuda":
        import torch

        return int(torch.cuda.memory_allocated(device))
    return heap_bytes() if device.type == "cpu" else None
