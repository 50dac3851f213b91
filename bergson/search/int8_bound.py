"""Exact top-k through a store's int8 copy: rows are ruled out by a proven bound, never by a guess.

The int8 copy (:mod:`bergson.search.int8_copy`) holds, for each stored row ``x``, its scale
``a = max|x|``, the int8 row ``r = round(127 x / a)`` and, exactly enough, ``x = (a/127) (r + d)``
with ``||d||`` (at most 0.5 per entry) recorded. A query ``q`` is quantized the same way once:
``q = c q8 + e`` with ``c = max|q| / 127`` and ``e`` known. Then

    x . q = (a/127) [c (r . q8) + r . e + d . q]
    |x . q - (a/127) c (r . q8)| <= (a/127) (||r|| ||e|| + ||d|| ||q||)

and ``r . q8`` is exact in int32 (:func:`bergson.search.int_matmul.int8_matmul`: ``torch._int_mm``
where the CPU runs it fast, float32 products of the integers, still exact, elsewhere).
So every row gets a lower and an upper bound on its score at integer-matmul speed. Padded further
for float32 rounding (the reference score's own, and the bounds' arithmetic), they bound the score
the float32 scan computes. The k-th best lower bound ``T`` of a query is a score that at least k
rows reach; a row whose upper bound is below ``T`` cannot be in the top-k, and every other row
is kept as a candidate and re-scored in float32 (:func:`bergson.search.scan.rescore`). The result
is the exact search's, at the cost of reading int8 rows (half a float16 store's bytes) plus a few
re-scored rows.

Within a chunk, every product is first compared with one threshold per query that every
candidate reaches (``T`` less the bound's largest slack over the chunk); only the entries that
pass get their bounds computed. The copy holds its rows sorted by scale within blocks, so most
chunks' factors ``a/127`` differ by little: there the integer products themselves are compared
with one integer per query (``T`` over the chunk's largest factor, or its smallest for a negative
``T``). In a chunk whose factors spread wider than ``NARROW`` (cosine scores, whose factors are
divided by the rows' norms; a block's largest and smallest scales) each product is scaled by its
row's factor first. For dot scores a chunk is passed over, without its products, when its
largest row norm times each query's norm (Cauchy-Schwarz, padded for rounding) is below every
query's threshold: the chunks of small rows of a store whose row norms spread widely. The first
chunk of a worker with no threshold yet takes its k-th best lower bound as one. With cosine
scores (``unit_norm``) both bounds are divided by the stored norm of the row.

Candidates are held in memory; a store whose scores are so close together that more than
``MAX_CANDIDATES`` rows stay candidates (all-equal rows, a zero query) raises
:class:`TooManyCandidates`, and the caller falls back to the float32 scan.
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

import numpy as np

from .int8_copy import Int8Copy
from .int_matmul import int8_matmul
from .scan import SingleThreadedWorkers, TopK, block_tensor, rescore, transposed

MAX_DIM = (2**31 - 1) // (127 * 127)
"""Widest row whose int8 products cannot overflow int32 (133,143 columns)."""

REFINE_AT = 4096
"""Entries past a chunk's comparison gathered (over chunks) before their bounds are computed."""

MAX_CANDIDATES = 1 << 22
"""Candidates (query, row pairs) held at once before the bound is given up on."""

CHUNK_BYTES = 1 << 21
"""int8 bytes per chunk (8,192 rows of 256): on 2 threads as fast as 4 MiB at 16 queries, 1.3x
faster at 64 (4 MiB: 1.02x faster at one query); faster than 0.5 and 1 MiB."""

PRODUCT_BYTES = 1 << 20
"""int32 products per chunk at most (fewer rows per chunk for many queries): at 64 queries on 2
threads, chunks of 1 MiB of int8 scanned 1.08x faster than 2 MiB."""

BLOCK_BYTES = 1 << 28
"""int8 bytes of the copy per block at least (the workers share a block and the candidates are
merged once per block): on 2 threads 256 MiB scanned 1.0-1.07x faster than 64 MiB (and 64 MiB
1.2x faster than 16 MiB)."""


NARROW = 1.5
"""Largest ratio of a chunk's row factors for which the integer products are compared directly."""

_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1


class TooManyCandidates(Exception):
    """The bounds leave more than ``MAX_CANDIDATES`` candidates: scan in float32 instead."""


def _cat(parts: list[tuple[np.ndarray, ...]], width: int) -> tuple[np.ndarray, ...]:
    if not parts:
        return tuple(np.zeros(0, np.int64) if i < 2 else np.zeros(0, np.float32) for i in range(width))
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(width))


def _prune(kept: list[tuple[np.ndarray, ...]], t: np.ndarray) -> None:
    """Keep, as one part, the (query, row, upper bound) candidates whose upper bound reaches their
    query's threshold ``t``."""
    qs, rows, upper = _cat(kept, 3)
    alive = upper >= t[qs]
    kept[:] = [(qs[alive], rows[alive], upper[alive])]
    if int(alive.sum()) > MAX_CANDIDATES:
        raise TooManyCandidates


class BlockFactors(NamedTuple):
    """What the scan needs of a block of the copy besides its rows, for one chunk size and score;
    the same for every search (kept per open store)."""

    g: np.ndarray
    """float32 [rows]: ``scale / 127`` (over the row's norm for cosine scores; NaN for a row with
    non-finite values)."""
    rn: np.ndarray
    """float32 [rows]: the norm of the int8 row."""
    dn: np.ndarray
    """float32 [rows]: a bound on the norm of its rounding error."""
    gmax: np.ndarray
    """float64 [chunks]: the largest ``g`` (NaN ignored; 0 for a chunk of non-finite rows only)."""
    gmin: np.ndarray
    """float64 [chunks]: the smallest."""
    narrow: np.ndarray
    """bool [chunks]: ``gmax <= NARROW * gmin`` (the integer products are compared directly)."""
    rmax: np.ndarray
    """float64 [chunks]: the largest ``rn``."""
    dmax: np.ndarray
    """float64 [chunks]: the largest ``dn``."""
    xmax: np.ndarray
    """float64 [chunks]: the largest norm of a stored row (0 for rows with non-finite values)."""


def block_factors(scales: np.ndarray, bounds: np.ndarray, chunk: int, unit_norm: bool) -> BlockFactors:
    """The :class:`BlockFactors` of a block of the copy (its rows' scales and bounds)."""
    scales = np.asarray(scales, np.float32)
    bounds = np.asarray(bounds, np.float32)
    g = scales / np.float32(127.0)
    if unit_norm:
        norms = bounds[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            g = np.where(norms > 0, g / norms, np.where(np.isnan(g), g, 0.0))
    g = np.ascontiguousarray(g, np.float32)
    rn = np.ascontiguousarray(bounds[:, 0])
    dn = np.ascontiguousarray(bounds[:, 1])
    starts = np.arange(0, len(g), chunk)
    gmax = np.nan_to_num(np.fmax.reduceat(g, starts).astype(np.float64), nan=0.0)
    gmin = np.nan_to_num(np.fmin.reduceat(g, starts).astype(np.float64), nan=0.0)
    return BlockFactors(
        g,
        rn,
        dn,
        gmax,
        gmin,
        (gmin > 0) & (gmax <= NARROW * gmin),
        np.maximum.reduceat(rn, starts).astype(np.float64),
        np.maximum.reduceat(dn, starts).astype(np.float64),
        np.nan_to_num(np.fmax.reduceat(bounds[:, 2], starts).astype(np.float64), nan=0.0),
    )


_FACTORS: weakref.WeakKeyDictionary[Any, tuple[Int8Copy, dict[tuple[Any, ...], BlockFactors]]] = (
    weakref.WeakKeyDictionary()
)
"""Per open store: its int8 copy and the factors of its blocks (12 bytes a row), by (first row,
rows, chunk rows, cosine, ``NARROW``); released with the store."""


class BoundedScanner(SingleThreadedWorkers):
    """Candidates of each block of an int8 copy (see the module text); a context manager like
    :class:`bergson.search.scan.ChunkScanner`."""

    def __init__(
        self,
        queries: np.ndarray,
        segments: list[tuple[int, int]],
        total_dim: int,
        *,
        k: int,
        unit_norm: bool,
        num_threads: int,
    ):
        import torch

        self.torch = torch
        self.num_q, self.width = queries.shape
        self.k = k
        self.segments = segments
        self.whole = segments == [(0, total_dim)]
        self.unit_norm = unit_norm
        self.num_threads = num_threads
        self.chunk = max(16, min(CHUNK_BYTES // max(self.width, 1), PRODUCT_BYTES // (4 * self.num_q)))
        self.merge_at = max(4096, 8 * self.num_q * k)
        q = queries.astype(np.float64)
        top = np.abs(q).max(axis=1)
        q8 = np.rint(q * np.where(top > 0, 127.0 / np.where(top > 0, top, 1.0), 0.0)[:, None])
        c = top / 127.0
        e_norm = np.linalg.norm(q - c[:, None] * q8, axis=1) * (1 + 1e-6)
        q_norm = np.linalg.norm(q, axis=1) * (1 + 1e-6)
        # float32 rounding of the reference score: at most width * 2^-24 * ||x|| ||q||, taken
        # twice; ||x|| <= (a/127)(||r|| + ||d||). A relative 1e-4 on the approximation covers the
        # bounds' own float32 arithmetic and the cosine's division.
        gamma = self.width * 2.0**-22
        self.c64 = c
        self.a_coef = 1.001 * e_norm + 1e-4 * (q_norm + e_norm) + gamma * q_norm  # times ||r||
        self.b_coef = (1.001 + gamma) * q_norm  # times ||d||
        # no float32 score of a row exceeds ||x|| ||q|| by more than this factor (Cauchy-Schwarz)
        self.q_ceiling = (1.001 + gamma) * q_norm
        self.q8t = transposed(torch.from_numpy(q8.astype(np.int8)))  # [width, Q]
        self.c32 = c.astype(np.float32)
        self.a32 = self.a_coef.astype(np.float32)
        self.b32 = self.b_coef.astype(np.float32)
        self.pool = None

    # ------------------------------------------------------------------ one worker's range
    def _scan_range(self, block: Any, s0: int, e0: int, t0: np.ndarray, first: int) -> tuple[Any, ...]:
        """Rows s0..e0 of the block: (the k best lower bounds per query, as a TopK; the candidates
        still above its threshold as (query, row, upper bound) arrays).

        Per chunk: the integer products, compared with the chunk's integer thresholds (or, in a
        wide chunk, scaled by their rows' factors and compared with its float ones; see
        :meth:`_thresholds`), and only the entries that pass get their bounds. The comparisons and
        the few candidates are numpy work (torch's small and boolean kernels cost more than the
        matmul here)."""
        torch = self.torch
        g, rn, dn = self.g, self.rn, self.dn
        num_q = self.num_q
        low = TopK(num_q, self.k)
        low.scores[:] = np.maximum(low.scores, t0[:, None])
        t = t0.copy()
        seeded = bool(np.isfinite(t).all())
        limits, theta, skip = self._thresholds(t)
        acc_all = torch.empty(self.chunk * num_q, dtype=torch.int32)
        scaled_all = torch.empty(self.chunk * num_q, dtype=torch.float32)
        passed = np.empty((self.chunk, num_q), bool)
        gathered = None if self.whole else torch.empty((self.chunk, self.width), dtype=torch.int8)
        pending: list[tuple[np.ndarray, ...]] = []
        kept: list[tuple[np.ndarray, ...]] = []
        found: list[np.ndarray] = []
        values: list[np.ndarray] = []
        waiting = waiting_found = 0

        def refine(t: np.ndarray) -> int:
            """Bounds of the entries found since the last call; those whose upper bound reaches ``t``
            go to ``pending`` (as query, store-block row, upper and lower bound). Returns how many."""
            nonlocal waiting_found
            if not found:
                return 0
            ri, qi = np.divmod(np.concatenate(found), num_q)
            product = np.concatenate(values).astype(np.float32)
            found.clear()
            values.clear()
            waiting_found = 0
            gg = g[ri]
            approx = gg * self.c32[qi] * product
            slack = gg * (rn[ri] * self.a32[qi] + dn[ri] * self.b32[qi])
            upper = approx + slack
            keep = upper >= t[qi]
            count = int(keep.sum())
            if count:
                pending.append((qi[keep], ri[keep] + first, upper[keep], (approx - slack)[keep]))
            return count

        for s in range(s0, e0, self.chunk):
            c = s // self.chunk
            if skip[c]:
                continue
            e = min(s + self.chunk, e0)
            n = e - s
            if gathered is None:
                rows = block[s:e]
            else:
                rows, col = gathered[:n], 0
                for a, z in self.segments:
                    rows[:, col : col + z - a].copy_(block[s:e, a:z])
                    col += z - a
            acc = acc_all[: n * num_q].view(n, num_q)
            int8_matmul(rows, self.q8t, acc)
            if not seeded and n >= self.k:
                t, seeded = np.maximum(t, self._seed(acc.numpy(), s, e)), True
                limits, theta, skip = self._thresholds(t)
            if self.narrow[c]:
                idx = np.flatnonzero(np.greater_equal(acc.numpy(), limits[c], out=passed[:n]))
            else:
                scaled = scaled_all[: n * num_q].view(n, num_q)
                scaled.copy_(acc).mul_(self.g_t[s:e, None])  # twice as fast as one promoting mul
                scaled.sub_(torch.from_numpy(theta[c]))
                idx = np.flatnonzero(scaled.numpy().ravel() >= 0)  # NaN (non-finite row): never
            if len(idx):  # kept by (row, query) position within the block, with its product
                found.append(idx + s * num_q)
                values.append(acc.numpy().ravel()[idx])
                waiting_found += len(idx)
            if waiting_found >= REFINE_AT:  # their bounds, a batch of chunks at once
                waiting += refine(t)
                if waiting >= self.merge_at:
                    t = self._merge(low, pending, kept)
                    pending, waiting = [], 0
                    limits, theta, skip = self._thresholds(t)
        refine(t)
        if pending:
            self._merge(low, pending, kept)
        return low, _cat(kept, 3)

    def _thresholds(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per chunk of the prepared block and query, given the thresholds ``t``: the integer that
        every candidate's product ``r . q8`` reaches (int32 [chunks, Q]), the value every
        candidate's ``g (r . q8)`` reaches (float32 [chunks, Q]), and whether the chunk can be
        passed over (bool [chunks]: for dot scores, none of its rows' norms times a query's reaches
        that query's threshold, so no row can be a candidate).

        A candidate's upper bound reaches ``t``, so ``g c (r . q8) >= num``: ``t`` less the bound's
        largest slack over the chunk. Then ``r . q8 >= num / (c g)``, at least ``num / (c g_max)``
        for a positive ``num`` and ``num / (c g_min)`` otherwise. Both are lowered a little for
        float rounding."""
        num = t[None, :] - self.slack_max
        with np.errstate(divide="ignore", invalid="ignore"):
            lim = num / (self.c64 * np.where(num > 0, self.gmax[:, None], self.gmin[:, None]))
            lim = np.floor(lim - np.abs(lim) * 1e-6) - 1
            lim = np.where(np.isnan(lim) | (self.c64 == 0), _INT_MIN, lim)
            theta = num / self.c64
        theta = np.where(np.isnan(theta) | (self.c64 == 0), -np.inf, theta - np.abs(theta) * 1e-6)
        skip = np.zeros(len(self.gmax), bool) if self.ceiling is None else ~(self.ceiling >= t).any(axis=1)
        return np.clip(lim, _INT_MIN, _INT_MAX).astype(np.int32), theta.astype(np.float32), skip

    def bounds(self, acc: np.ndarray, s: int, e: int) -> tuple[np.ndarray, np.ndarray]:
        """float32 [e - s, Q] lower and upper bounds on the float32 scores of rows s..e of the
        prepared block (:meth:`prepare`), given their integer products ``acc`` with the queries;
        NaN for a row with non-finite values."""
        g = self.g[s:e, None]
        slack = g * (self.rn[s:e, None] * self.a32 + self.dn[s:e, None] * self.b32)
        approx = g * self.c32 * acc.astype(np.float32)
        return approx - slack, approx + slack

    def _seed(self, acc: np.ndarray, s: int, e: int) -> np.ndarray:
        """float32 [Q]: the k-th best lower bound among rows s..e (integer products ``acc``), a
        first threshold: these rows stay in the scan, so the final one can only be higher."""
        lower = self.bounds(acc, s, e)[0]
        lower[np.isnan(lower)] = -np.inf  # a row with non-finite values never counts
        return np.partition(lower, len(lower) - self.k, axis=0)[len(lower) - self.k]

    def _merge(
        self, low: TopK, pending: list[tuple[np.ndarray, ...]], kept: list[tuple[np.ndarray, ...]]
    ) -> np.ndarray:
        """Offer the pending candidates' lower bounds to ``low``, move them to ``kept`` and drop every
        kept candidate whose upper bound fell below the new threshold, which is returned."""
        qs, rows, upper, lower = _cat(pending, 4)
        low.push_candidates(qs, rows, lower)
        t = low.scores[:, -1].copy()
        kept.append((qs, rows, upper))
        _prune(kept, t)
        return t

    # ------------------------------------------------------------------ one block
    def prepare(self, scales: np.ndarray, bounds: np.ndarray, factors: BlockFactors | None = None) -> None:
        """Per-row factors of a block of the copy (``factors``, when given, are those of these rows
        for this scanner's chunk size and score, kept from an earlier search) and each chunk's
        largest bound slack per query."""
        f = factors or block_factors(scales, bounds, self.chunk, self.unit_norm)
        self.g, self.rn, self.dn = f.g, f.rn, f.dn
        self.g_t = self.torch.from_numpy(self.g)
        self.gmax, self.gmin, self.narrow = f.gmax, f.gmin, f.narrow
        # [chunks, Q]: the largest score a chunk's rows can have (none for cosine scores)
        self.ceiling = None if self.unit_norm else f.xmax[:, None] * self.q_ceiling
        # [chunks, Q]: the bound's largest slack over each chunk
        self.slack_max = f.gmax[:, None] * (f.rmax[:, None] * self.a_coef + f.dmax[:, None] * self.b_coef)

    def __call__(
        self,
        block: np.ndarray,
        scales: np.ndarray,
        bounds: np.ndarray,
        first: int,
        top: TopK,
        kept: list,
        factors: BlockFactors | None = None,
    ) -> None:
        """Scan one block of the int8 copy (its rows' scales and bounds beside it) whose first row
        is ``first``: the lower bounds go into ``top`` (the k best per query so far), the candidates
        into ``kept``, pruned against the new thresholds."""
        self.prepare(scales, bounds, factors)
        tblock = block_tensor(self.torch, block)
        t0 = top.scores[:, -1].copy()
        for low, found in self.split(self._scan_range, tblock, block.shape[0], self.chunk, t0, first):
            top.push_candidates(*low.entries())  # in row order, as push_candidates wants
            kept.append(found)
        _prune(kept, top.scores[:, -1])


def bounded_topk(
    st: Any,
    copy: Int8Copy,
    q: np.ndarray,
    segments: list[tuple[int, int]],
    total: int,
    kk: int,
    *,
    unit_norm: bool,
    num_threads: int,
    block_rows: int,
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The exact top-``kk`` of prepared queries ``q`` over the store ``st`` read through its int8
    ``copy``: (scores, indices, rows left out for non-finite values). Raises
    :class:`TooManyCandidates` when the bounds cannot narrow the search."""
    n = copy.rows.shape[0]
    block_rows = max(block_rows, BLOCK_BYTES // max(copy.rows.shape[1], 1))
    top = TopK(q.shape[0], kk)
    kept: list[tuple[np.ndarray, ...]] = []
    bad: list[int] = []
    held = _FACTORS.get(st)
    if held is None or held[0] is not copy:
        held = _FACTORS[st] = (copy, {})
    with BoundedScanner(q, segments, total, k=kk, unit_norm=unit_norm, num_threads=num_threads) as scan:
        for first in range(0, n, block_rows):
            part = slice(first, first + block_rows)
            scales, bounds = copy.scales[part], copy.bounds[part]
            bad += copy.order[np.flatnonzero(~np.isfinite(scales)) + first].tolist()
            key = (first, len(scales), scan.chunk, unit_norm, NARROW)
            if key not in held[1]:
                held[1][key] = block_factors(scales, bounds, scan.chunk, unit_norm)
            scan(copy.rows[part], scales, bounds, first, top, kept, held[1][key])
        qs, rows, _ = _cat(kept, 3)
        rows = copy.order[rows]  # copy rows -> store rows
        counts = np.bincount(qs, minlength=q.shape[0])
        cand = np.full((q.shape[0], max(1, int(counts.max(initial=0)))), -1, np.int64)
        order = np.argsort(qs, kind="stable")
        starts = np.cumsum(counts) - counts
        cand[qs[order], np.arange(len(qs)) - starts[qs[order]]] = rows[order]
        scores, indices = rescore(st, q, segments, cand, kk, unit_norm=unit_norm)
    return scores, indices, sorted(bad)
