"""Exact int8 matrix products on any CPU: ``torch._int_mm``, or float32 where that is faster.

The int8 search paths multiply int8 rows by int8 queries and need the int32 result exactly.
``torch._int_mm`` gives it, and it is fast where the CPU has integer dot-product instructions
(AVX-512 VNNI, AMX). Elsewhere it can be far slower than a float32 matrix product: on an AVX2
AMD EPYC it took 69 ms for a [32, 256] x [256, 8192] product that float32 ``torch.mm`` ran in
7.4 ms (one thread).

The float32 route is exact too. Both factors are in [-127, 127], so every partial sum of a dot
product over at most ``EXACT_DEPTH`` = 1024 terms is an integer of magnitude at most
1024 * 127**2 < 2**24, which float32 represents exactly whatever order the matrix product adds in.
Deeper products are summed 1024 columns at a time in int32. So the two routes return the same
integers, and which one runs changes only the speed: the first call for a number of query
columns times both on a small product of that many columns and keeps the faster for the process
(:func:`kernel`). ``BERGSON_INT8_MATMUL=int`` or ``float`` fixes the choice.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from typing import Any

logger = logging.getLogger(__name__)

EXACT_DEPTH = 1024
"""Most terms of a float32 dot product of int8 values in [-127, 127] that stay exact (< 2**24)."""

KERNELS = ("int", "float")

PROBE_ROWS = 8192
"""Rows of the product each kernel is timed on (of 256 columns, against the caller's count of
query columns): a chunk of the int8 scan."""

_lock = threading.Lock()
_chosen: dict[int, str] = {}
_local = threading.local()


def kernel(columns: int = 32) -> str:
    """``"int"`` (``torch._int_mm``) or ``"float"`` (float32 matrix products) for products with
    ``columns`` query columns: fixed by ``BERGSON_INT8_MATMUL``, else the faster on this CPU,
    measured once per process and column count (``torch._int_mm``'s time grows with the columns
    where the CPU lacks integer dot products, the float route's hardly)."""
    chosen = _chosen.get(columns)
    if chosen is None:
        with _lock:
            chosen = _chosen.get(columns)
            if chosen is None:
                chosen = _chosen[columns] = _choose(columns)
    return chosen


def reset() -> None:
    """Forget the kernels chosen so far (the next product measures, or reads the variable, again)."""
    with _lock:
        _chosen.clear()


def _choose(columns: int) -> str:
    forced = os.environ.get("BERGSON_INT8_MATMUL", "").strip().lower()
    if forced:
        if forced not in KERNELS:
            from ..errors import BergsonError

            raise BergsonError(
                f"BERGSON_INT8_MATMUL={forced!r}: choose int or float (or unset it to measure)"
            )
        return forced
    import torch

    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(-127, 128, (PROBE_ROWS, 256), dtype=torch.int8, generator=gen)
    queries = torch.randint(-127, 128, (columns, 256), dtype=torch.int8, generator=gen).t()
    out = torch.empty(PROBE_ROWS, columns, dtype=torch.int32)
    seconds = {}
    for name in ("float", "int"):  # float first: where int is far slower, one run of it settles it
        _matmul(name, rows, queries, out)  # untimed: a kernel's first call may set itself up
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            _matmul(name, rows, queries, out)
            best = min(best, time.perf_counter() - start)
            if name == "int" and best > 2 * seconds["float"]:
                break
        seconds[name] = best
    chosen = min(seconds, key=seconds.__getitem__)
    logger.debug(
        "int8 matrix products with %d query columns through %s (measured %.2f ms with torch._int_mm, "
        "%.2f ms in float32)",
        columns,
        "torch._int_mm" if chosen == "int" else "float32 torch.mm",
        1e3 * seconds["int"],
        1e3 * seconds["float"],
    )
    return chosen


def _buffer(name: str, shape: tuple[int, ...], torch: Any) -> Any:
    """A float32 scratch tensor of ``shape`` owned by the calling thread (grown, never shrunk)."""
    size = math.prod(shape)
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    buf = bufs.get(name)
    if buf is None or buf.numel() < size:
        buf = bufs[name] = torch.empty(size, dtype=torch.float32)
    return buf[:size].view(shape)


def _as_float(name: str, x: Any, torch: Any) -> Any:
    """``x`` converted into a float32 scratch buffer, in its own layout (a transposed view of a
    contiguous tensor is converted as that tensor and returned transposed)."""
    if x.dim() == 2 and not x.is_contiguous() and x.t().is_contiguous():
        buf = _buffer(name, tuple(x.t().shape), torch)
        buf.copy_(x.t())
        return buf.t()
    buf = _buffer(name, tuple(x.shape), torch)
    buf.copy_(x)
    return buf


def _matmul(name: str, a: Any, b: Any, out: Any) -> Any:
    import torch

    if name == "int":
        return torch._int_mm(a, b, out=out)
    m, depth = a.shape
    n = b.shape[1]
    af, bf = _as_float("a", a, torch), _as_float("b", b, torch)
    res = _buffer("out", (m, n), torch)
    for s in range(0, depth, EXACT_DEPTH):
        e = min(s + EXACT_DEPTH, depth)
        torch.mm(af[:, s:e], bf[s:e], out=res)
        if s == 0:
            out.copy_(res)
        else:
            out.add_(res.to(torch.int32))
    return out


def int8_matmul(a: Any, b: Any, out: Any) -> Any:
    """``out`` (int32 [m, n]) = ``a`` (int8 [m, k]) @ ``b`` (int8 [k, n]), exactly, through the
    faster kernel of this CPU for its shape (:func:`kernel`, keyed by the smaller of ``m`` and
    ``n``: the query columns). Factors must lie in [-127, 127]."""
    return _matmul(kernel(min(a.shape[0], b.shape[1])), a, b, out)
