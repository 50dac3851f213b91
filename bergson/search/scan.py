"""The kernel of exact search: a store block scored chunk by chunk, keeping candidates only.

A block of stored rows is split between worker threads, and each worker's share is cut into
chunks of ``CHUNK_BYTES`` of float32 (sized for the L2 cache). For each chunk the worker
converts the rows to float32 once (into a buffer it reuses), multiplies them by all queries
(one single-threaded float32 matmul), divides by the rows' norms (``unit_norm``) and keeps only
the rows that can still enter a query's top-k. The worker holds its own running top-k per query
(:class:`TopK`), starting from the block's thresholds (the k-th best score
of the rows before the block); within a chunk it compares the best score of each group of
``_GROUP`` rows with the query's threshold and looks row by row only at the groups that beat
it. The [queries, block rows] score matrix is never written out: the dense kernel
(:class:`bergson.search.exact.BlockScorer`, still used below 32 queries, where it is faster) writes
it and then makes several numpy passes over it per block, which is what makes it slow at many
queries.

With ``int8=True`` the chunk is quantized first (one scale per row: its largest magnitude maps
to 127; the queries likewise, once) and scored by an exact integer matmul
(:func:`bergson.search.int_matmul.int8_matmul`). Those scores are approximate: the caller keeps more candidates than
it returns and re-scores them exactly (:func:`rescore`).

Ties and order are those of :class:`TopK`: descending score, then
ascending row. A row enters only by beating a threshold strictly, and every threshold is a score
held by a lower row, so no row of the exact top-k is ever dropped.
"""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .int_matmul import int8_matmul

CHUNK_BYTES = 1 << 20
"""Float32 bytes of one converted chunk (rows x selected columns): half the 2 MiB L2 cache of a
core of the machine it was tuned on (a 2-core AMD EPYC; 1 MiB was the best of 0.25, 0.5, 1 and
2 MiB at 16 queries, on a loaded machine)."""

INT8_CHUNK_BYTES = 1 << 21
"""Bytes of int8 rows per chunk when they come from an int8 copy (no float32 buffer): at 16
queries 2 MiB scanned 1.4x faster than the float32-sized chunk (1,024 rows of 256)."""

_GROUP = 64
"""Rows per group whose best score is compared with the threshold before any row is."""
EMPTY = np.iinfo(np.int64).max
"""TopK's index of an empty slot."""

Candidates = tuple[np.ndarray, np.ndarray, np.ndarray]
"""(query, row, score) of every candidate, three 1-D arrays."""


class TopK:
    """A running top-k per query, ordered by descending score, ties by ascending row.

    Blocks must be offered in increasing row order (every row of a later block has a
    higher index than every row already held); that makes the merge a stable sort.
    """

    def __init__(self, num_queries: int, k: int):
        self.k = k
        self.scores = np.full((num_queries, k), -np.inf, np.float32)
        self.indices = np.full((num_queries, k), EMPTY, np.int64)

    def push(self, scores: np.ndarray, first_row: int) -> None:
        """Offer a block of scores [Q, b] for rows first_row .. first_row + b - 1."""
        k = self.k
        num_q, b = scores.shape
        # A new row must beat the k-th score held strictly: on a tie the lower row wins.
        mask = scores > self.scores[:, -1:]
        counts = np.count_nonzero(mask, axis=1)
        if not counts.any():
            return
        big = np.flatnonzero(counts > k)
        if len(big):
            # Keep only the exact top-k of these queries: everything above the k-th
            # largest value, then the lowest-indexed rows equal to it.
            sub = scores[big]
            kth = np.partition(sub, b - k, axis=1)[:, b - k : b - k + 1]
            above = sub > kth
            ties = sub == kth
            need = k - np.count_nonzero(above, axis=1, keepdims=True)
            mask[big] = above | (ties & (np.cumsum(ties, axis=1) <= need))
            counts[big] = k
        flat = np.flatnonzero(mask)  # ordered by query, then row
        qs, rows = np.divmod(flat, b)
        width = int(counts.max())
        starts = np.cumsum(counts) - counts
        pos = np.arange(len(flat)) - starts[qs]
        cand_s = np.full((num_q, width), -np.inf, np.float32)
        cand_i = np.full((num_q, width), EMPTY, np.int64)
        cand_s[qs, pos] = scores.ravel()[flat]
        cand_i[qs, pos] = rows + first_row
        all_s = np.concatenate([self.scores, cand_s], axis=1)
        all_i = np.concatenate([self.indices, cand_i], axis=1)
        # Held rows come first and are already ordered; new rows follow in row order, so
        # a stable sort on the score alone breaks ties by row index.
        order = np.argsort(-all_s, axis=1, kind="stable")[:, :k]
        self.scores = np.take_along_axis(all_s, order, axis=1)
        self.indices = np.take_along_axis(all_i, order, axis=1)

    def entries(self) -> Candidates:
        """The (query, row, score) of every entry held, as three 1-D arrays."""
        q, pos = np.nonzero(self.indices != EMPTY)
        return q, self.indices[q, pos], self.scores[q, pos]

    def push_candidates(self, qs: np.ndarray, rows: np.ndarray, scores: np.ndarray) -> None:
        """Offer candidates as (query, row, score) arrays; every row must be higher than every row
        already held (so offer one block's candidates after the previous block's). Only the
        queries that have candidates are merged."""
        if len(qs) == 0:
            return
        order = np.lexsort((rows, qs))  # by query, then row
        qs, rows, scores = qs[order], rows[order], scores[order]
        touched, local, counts = np.unique(qs, return_inverse=True, return_counts=True)
        starts = np.cumsum(counts) - counts
        pos = np.arange(len(qs)) - starts[local]
        width = int(counts.max())
        cand_s = np.full((len(touched), width), -np.inf, np.float32)
        cand_i = np.full((len(touched), width), EMPTY, np.int64)
        cand_s[local, pos] = scores
        cand_i[local, pos] = rows
        all_s = np.concatenate([self.scores[touched], cand_s], axis=1)
        all_i = np.concatenate([self.indices[touched], cand_i], axis=1)
        # held rows first (ordered), then new rows in row order: a stable sort on the score
        # alone breaks ties by row index
        keep = np.argsort(-all_s, axis=1, kind="stable")[:, : self.k]
        self.scores[touched] = np.take_along_axis(all_s, keep, axis=1)
        self.indices[touched] = np.take_along_axis(all_i, keep, axis=1)


def chunk_rows_for(width: int, num_q: int, *, int8: bool = False) -> int:
    """Rows per chunk: ``CHUNK_BYTES`` of float32, up to 4x more for fewer than 16 queries, where
    the matmul hardly reuses a row and the per-chunk Python work is what a bigger chunk saves.
    Rows read from an int8 copy are not converted: a chunk holds ``INT8_CHUNK_BYTES`` of them."""
    if int8:
        return max(16, INT8_CHUNK_BYTES // max(width, 1))
    scale = min(4, max(1, 16 // max(num_q, 1)))
    return max(16, scale * CHUNK_BYTES // (4 * max(width, 1)))


def block_tensor(torch: Any, block: np.ndarray) -> Any:
    """A torch view of a store block (copied only when its strides are negative). torch warns that
    memory-mapped blocks are read-only; the kernels only read them, so the warning is silenced."""
    import warnings

    if any(stride < 0 for stride in block.strides):
        block = np.ascontiguousarray(block)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(block)


def transposed(rows: Any) -> Any:
    """``rows.T`` for an integer matmul: a view, except for rows of one column, whose transposed
    view has strides (1, 1), which ``torch._int_mm`` misreads (it gets a copy)."""
    return rows.T if rows.shape[1] > 1 else rows.reshape(1, -1).clone()


def gather_columns(rows: Any, block: Any, s: int, e: int, segments: Any) -> None:
    """Copy rows ``s:e`` of ``block`` into the buffer ``rows``: whole, or only the column
    ``segments`` [(start, end), ...] side by side (None: every column)."""
    if segments is None:
        rows.copy_(block[s:e])
        return
    col = 0
    for a, z in segments:
        rows[:, col : col + z - a].copy_(block[s:e, a:z])
        col += z - a


SWITCH_INTERVAL_S = 5e-4
"""Python's thread switch interval while several search workers run (restored after)."""


class SingleThreadedWorkers:
    """A context in which torch runs one thread per worker: ``num_threads`` workers (a thread pool
    when more than one) each doing single-threaded matmuls, torch's own setting restored at exit."""

    torch: Any
    num_threads: int
    pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> Any:
        self.saved_threads = self.torch.get_num_threads()
        self.saved_switch = sys.getswitchinterval()
        self.torch.set_num_threads(1)
        if self.num_threads > 1:
            self.pool = ThreadPoolExecutor(
                self.num_threads, initializer=self.torch.set_num_threads, initargs=(1,)
            )
            # the workers' many short numpy calls hand the GIL over sooner: on 2 threads the
            # bounded int8 scan ran 1.07x faster with 0.5 ms than with Python's default 5 ms
            sys.setswitchinterval(min(self.saved_switch, SWITCH_INTERVAL_S))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        sys.setswitchinterval(self.saved_switch)
        self.torch.set_num_threads(self.saved_threads)

    def split(self, fn: Any, block: Any, rows: int, chunk: int, *args: Any) -> list[Any]:
        """``fn(block, start, end, *args)`` over the block's ``rows`` cut into whole chunks, one
        contiguous range per worker; the results in row order."""
        n_chunks = -(-rows // chunk)
        parts = min(self.num_threads, n_chunks)
        if self.pool is None or parts <= 1:
            return [fn(block, 0, rows, *args)]
        per = -(-n_chunks // parts) * chunk
        jobs = [self.pool.submit(fn, block, s, min(s + per, rows), *args) for s in range(0, rows, per)]
        return [job.result() for job in jobs]


class ChunkScanner(SingleThreadedWorkers):
    """Scores blocks of stored rows and returns each block's candidates (see the module text).

    Use as a context manager: inside it torch runs single-threaded kernels, one per worker thread
    (independent workers keep going on a busy machine, where kernels that synchronise their
    threads on every call stall); the previous thread count is restored on exit.
    """

    def __init__(
        self,
        queries: np.ndarray,
        segments: list[tuple[int, int]],
        total_dim: int,
        *,
        k: int,
        unit_norm: bool,
        num_threads: int,
        int8: bool = False,
        chunk_rows: int | None = None,
    ):
        import torch  # here, so that ``import bergson.search`` stays torch-free

        self.torch = torch
        self.num_q, self.width = queries.shape
        self.k = k
        self.segments = segments
        self.whole = segments == [(0, total_dim)]
        self.unit_norm = unit_norm
        self.int8 = int8
        self.chunk = chunk_rows or chunk_rows_for(self.width, self.num_q)
        self.num_threads = num_threads
        self.merge_at = max(4096, 8 * self.num_q * k)
        """Pending candidates that trigger a merge into the worker's top-k."""
        q = torch.from_numpy(queries)
        if int8:
            self.q_int8 = quantize_rows(torch, q)  # [Q, width]; queries are finite
        self.queries = q
        self.scales: Any = None
        self.local = threading.local()
        self.pool: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ one chunk
    def _buffers(self) -> dict[str, Any]:
        """This worker's buffers, allocated once: a fresh allocation per chunk costs more than the
        arithmetic (large allocations are fresh pages, faulted in one by one)."""
        bufs = getattr(self.local, "bufs", None)
        if bufs is None:
            torch, c = self.torch, self.chunk
            bufs = self.local.bufs = {
                "rows": torch.empty((c, self.width), dtype=torch.float32),
                "out": torch.empty(self.num_q * c, dtype=torch.float32),
            }
            if self.int8:
                bufs["int8"] = torch.empty((c, self.width), dtype=torch.int8)
                bufs["int32"] = torch.empty(self.num_q * c, dtype=torch.int32)
                bufs["scale"] = torch.empty(c, dtype=torch.float32)
        return bufs

    def score_chunk(self, block: Any, s: int, e: int) -> tuple[Any, Any]:
        """Scores [Q, e - s] of rows s..e (approximate with ``int8``; a view of a worker buffer)
        and a bool [e - s] mask of the rows whose scores are not all finite (set to -inf), or
        None."""
        torch = self.torch
        bufs = self._buffers()
        n = e - s
        if self.scales is not None:
            return self._score_int8_copy(block, s, e, bufs)
        rows = bufs["rows"][:n]
        gather_columns(rows, block, s, e, None if self.whole else self.segments)
        out = bufs["out"][: self.num_q * n].view(self.num_q, n)  # contiguous, as mm's out= wants
        norms = torch.linalg.vector_norm(rows, dim=1) if self.unit_norm else None
        if self.int8:
            scale = bufs["scale"][:n]
            torch.maximum(rows.amax(dim=1), rows.amin(dim=1).neg_(), out=scale)
            rows.mul_(torch.where(scale > 0, 127.0 / scale, 0.0)[:, None]).round_()
            ri = bufs["int8"][:n]
            ri.copy_(rows)
            acc = bufs["int32"][: self.num_q * n].view(self.num_q, n)
            int8_matmul(self.q_int8, transposed(ri), acc)
            out.copy_(acc)
            # times each row's largest magnitude (a non-finite one makes the whole column
            # non-finite); the queries' scales and 1/127 are left out: no ranking needs them
            out.mul_(scale)
        else:
            torch.mm(self.queries, rows.T, out=out)
        if norms is not None:
            out.mul_(torch.where(norms > 0, norms.reciprocal(), 0.0))
        bad = None
        if not bool(torch.isfinite(out.sum())):  # one cheap reduction; then the slow look
            bad = ~torch.isfinite(out).all(dim=0)
            if self.int8:  # a row with non-finite values has a non-finite scale
                bad |= ~torch.isfinite(bufs["scale"][:n])
            out[:, bad] = -torch.inf
        return out, bad

    def _scan_range(self, block: Any, s0: int, e0: int, thr: np.ndarray, first: int) -> tuple[Any, list[int]]:
        """The exact top-k (by this scanner's scores) of rows s0..e0 that beat ``thr``, as a
        :class:`TopK`-like pair of [Q, k] arrays, and the rows holding non-finite values."""
        torch = self.torch
        top = TopK(self.num_q, self.k)
        top.scores[:] = np.maximum(top.scores, thr[:, None])  # entries only a later row can beat
        bad_rows: list[int] = []
        g = _GROUP
        # candidates wait in ``pending`` and are merged once there are enough of them (a merge
        # costs far more than comparing with a stale, lower threshold, which only lets more in)
        pending: list[tuple[Any, Any, Any]] = []
        waiting = 0
        t = torch.from_numpy(top.scores[:, -1].copy())
        for s in range(s0, e0, self.chunk):
            e = min(s + self.chunk, e0)
            out, bad = self.score_chunk(block, s, e)
            if bad is not None:
                bad_rows += (bad.nonzero().flatten().numpy() + first + s).tolist()
            n = e - s
            if n % g == 0:
                # best score of every group of g rows, per query; only groups that beat the
                # threshold are looked at row by row
                groups = out.view(self.num_q, n // g, g)
                qi, gi = (groups.amax(dim=2) > t[:, None]).nonzero(as_tuple=True)
                if qi.shape[0] == 0:
                    continue
                vals = groups[qi, gi]  # [hits, g]
                h, j = (vals > t[qi, None]).nonzero(as_tuple=True)
                cq, cr, cs = qi[h], gi[h] * g + j + (first + s), vals[h, j]
            else:
                cq, cr = (out > t[:, None]).nonzero(as_tuple=True)
                cs = out[cq, cr]
                cr = cr + (first + s)
            if cq.shape[0] == 0:
                continue
            pending.append((cq, cr, cs))
            waiting += cq.shape[0]
            if waiting >= self.merge_at:
                self._merge(top, pending)
                pending, waiting = [], 0
                t = torch.from_numpy(top.scores[:, -1].copy())
        if pending:
            self._merge(top, pending)
        return top, bad_rows

    def _score_int8_copy(self, block: Any, s: int, e: int, bufs: dict[str, Any]) -> tuple[Any, Any]:
        """Approximate scores of rows s..e of an int8 copy (``block`` is int8, ``self.scales``
        its rows' scales, NaN for a row with non-finite values, whose scores become -inf)."""
        torch = self.torch
        n = e - s
        if self.whole:
            ri = block[s:e]
        else:
            ri, col = bufs["int8"][:n], 0
            for a, z in self.segments:
                ri[:, col : col + z - a].copy_(block[s:e, a:z])
                col += z - a
        out = bufs["out"][: self.num_q * n].view(self.num_q, n)
        acc = bufs["int32"][: self.num_q * n].view(self.num_q, n)
        int8_matmul(self.q_int8, transposed(ri), acc)
        out.copy_(acc)
        scale = self.scales[s:e]
        if self.unit_norm:  # the scale cancels in a cosine
            rows = bufs["rows"][:n]
            rows.copy_(ri)
            norms = torch.linalg.vector_norm(rows, dim=1)
            out.mul_(torch.where(norms > 0, norms.reciprocal(), 0.0))
        else:
            out.mul_(scale)
        bad = ~torch.isfinite(scale)
        if not bool(bad.any()):
            return out, None
        out[:, bad] = -torch.inf
        return out, bad

    def _merge(self, top: TopK, pending: list[tuple[Any, Any, Any]]) -> None:
        torch = self.torch
        top.push_candidates(
            torch.cat([p[0] for p in pending]).numpy(),
            torch.cat([p[1] for p in pending]).numpy(),
            torch.cat([p[2] for p in pending]).numpy(),
        )

    def __call__(
        self, block: np.ndarray, first: int, thr: np.ndarray, scales: np.ndarray | None = None
    ) -> tuple[Candidates, list[int]]:
        """Candidates of a block whose first row is ``first``, given the running thresholds
        (float32 [Q]: a row must score strictly above), and the rows holding non-finite values
        (never candidates). With ``scales`` the block is a slice of an int8 copy
        (:mod:`bergson.search.int8_copy`) and these are its rows' scales."""
        self.scales = None if scales is None else self.torch.from_numpy(np.asarray(scales, np.float32))

        thr = np.ascontiguousarray(thr, np.float32)
        tblock = block_tensor(self.torch, block)
        results = self.split(self._scan_range, tblock, block.shape[0], self.chunk, thr, first)
        found = [top.entries() for top, _ in results]
        bad = [x for r in results for x in r[1]]
        qs, rows, scores = (np.concatenate([f[i] for f in found]) for i in range(3))
        return (qs, rows, scores), bad


def quantize_rows(torch: Any, x: Any) -> Any:
    """int8 rows ``round(127 * x / max|x|)``, row by row (an all-zero row stays zero)."""
    amax = x.abs().amax(dim=1)
    inv = torch.where(amax > 0, 127.0 / amax, 0.0)
    return (x * inv[:, None]).round_().to(torch.int8)


def rescore(
    store: Any,
    queries: np.ndarray,
    segments: list[tuple[int, int]],
    candidates: np.ndarray,
    k: int,
    *,
    unit_norm: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-k among each query's candidate rows ([Q, c] int64, -1 for none): scores in
    float32 as the exact scan computes them, best first, ties by ascending row, padded with
    (-inf, -1)."""
    import torch

    num_q = queries.shape[0]
    valid = candidates >= 0
    uniq = np.unique(candidates[valid])
    out_s = np.full((num_q, k), -np.inf, np.float32)
    out_i = np.full((num_q, k), -1, np.int64)
    if len(uniq) == 0:
        return out_s, out_i
    data = store if isinstance(store, np.ndarray) else store.all
    raw = np.asarray(data[uniq])
    rows = torch.from_numpy(np.concatenate([raw[:, a:b] for a, b in segments], axis=1).astype(np.float32))
    scores = torch.mm(torch.from_numpy(queries), rows.T)
    if unit_norm:
        norms = torch.linalg.vector_norm(rows, dim=1)
        scores.mul_(torch.where(norms > 0, norms.reciprocal(), 0.0))
    scores_np = scores.numpy()
    pos = np.searchsorted(uniq, np.where(valid, candidates, uniq[0]))
    cand_s = np.where(valid, np.take_along_axis(scores_np, pos, axis=1), -np.inf)
    cand_s = np.where(np.isfinite(cand_s), cand_s, -np.inf).astype(np.float32)
    cand_i = np.where(valid & np.isfinite(cand_s), candidates, np.iinfo(np.int64).max)
    order = np.lexsort((cand_i, -cand_s), axis=1)[:, :k]
    top_s = np.take_along_axis(cand_s, order, axis=1)
    top_i = np.take_along_axis(cand_i, order, axis=1)
    n = top_s.shape[1]
    out_s[:, :n] = top_s
    out_i[:, :n] = np.where(top_i == np.iinfo(np.int64).max, -1, top_i)
    return out_s, out_i
