"""Exact top-k search over a gradient store, streamed in row blocks.

Score orientation (the same everywhere in bergson): a score is the inner product of a
query's gradient with a stored row's gradient (or their cosine with ``unit_norm=True``).
To first order, one step of gradient descent on a stored row changes the query's loss
by ``-lr * score``, so a **positive score means that training on the row lowers the
query's loss** (a "proponent"); negative scores are "opponents".

The store is never loaded whole: it is read block by block (memory-mapped) and worker threads
score each block in cache-sized chunks (converted to float32 once, multiplied by all queries at
once). Below 32 queries the block's scores are kept whole and merged into a running top-k per
query (:class:`BlockScorer`, :meth:`TopK.push`); from 32 queries on, and for ``int8_rerank``,
each chunk hands back only the rows that can still enter a query's top-k
(:mod:`bergson.search.scan`), which is faster there.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from ..core.rows import unit_rows_np
from ..errors import BergsonError
from .scan import (
    EMPTY,
    ChunkScanner,
    SingleThreadedWorkers,
    TopK,
    block_tensor,
    chunk_rows_for,
    gather_columns,
    rescore,
)

if TYPE_CHECKING:
    from ..store.reader import GradientStore

StoreLike = Union["GradientStore", np.ndarray, str, Path]
"""A GradientStore, the path of one, or a 2-D array [rows, dim] of stored vectors."""

logger = logging.getLogger(__name__)

_BLOCK_ROWS = 65536
"""Default rows read per block: the workers share a block, and candidates are merged once per
block."""


# ------------------------------------------------------------------------- inputs
def open_store(store: StoreLike) -> GradientStore | np.ndarray:
    """A GradientStore or a 2-D array; paths are opened with ``load_gradients``."""
    if isinstance(store, (str, Path)):
        from ..store.reader import load_gradients

        return load_gradients(store)
    if isinstance(store, np.ndarray):
        if store.ndim != 2:
            raise BergsonError(
                f"the store array must be 2-D [rows, dim], got shape {store.shape}; "
                "reshape it or pass a GradientStore"
            )
        return store
    return store


def store_rows(store: GradientStore | np.ndarray) -> int:
    return int(store.shape[0]) if isinstance(store, np.ndarray) else len(store)


def column_segments(
    store: GradientStore | np.ndarray, modules: Sequence[str] | None
) -> tuple[list[tuple[int, int]], int]:
    """Column ranges [start, stop) of the selected modules, in the order given, and the
    store's full width."""
    if isinstance(store, np.ndarray):
        if modules is not None:
            raise BergsonError(
                "modules= needs a GradientStore (a plain array has no module layout); "
                "slice the array's columns yourself or pass load_gradients(path)"
            )
        return [(0, int(store.shape[1]))], int(store.shape[1])
    manifest = store.manifest
    total = manifest.total_dim
    if modules is None:
        return [(0, total)], total
    if isinstance(modules, str):
        modules = [modules]
    if len(modules) == 0:
        raise BergsonError("modules= is empty; name at least one module or pass modules=None for all")
    if len(set(modules)) != len(modules):
        raise BergsonError(f"modules= lists a module twice: {list(modules)}; list each module once")
    segments = []
    for name in select_store_modules(store, modules):
        m = manifest.module(name)
        segments.append((m.offset, m.offset + m.dim))
    return segments, total


def store_prefix(manifest: Any) -> str | None:
    """Where the base model sat in the model a store was built from (the store spells module names
    from that model); None for a store that does not record it."""
    return manifest.model.get("base_model") if isinstance(manifest.model, dict) else None


def select_store_modules(store: GradientStore, modules: Sequence[str], option: str = "modules=") -> list[str]:
    """The store's column blocks named by ``modules``: exact names or globs, spelled from the whole
    model (``gpt_neox.layers.0.mlp.dense_4h_to_h``) or from its base model (``layers.0.mlp.*``);
    a module split into attention heads is named by its own name or its blocks'
    (``...dense.head0``). Blocks come in the order of the patterns given, each once; a pattern
    naming no block is an error listing some of the store's names."""
    from ..core.layout import layout_module, names_module, some_names

    manifest = store.manifest
    prefix = store_prefix(manifest) or ""
    out: list[str] = []
    for pattern in [modules] if isinstance(modules, str) else modules:
        hits = [
            m.name
            for m in manifest.modules
            if names_module(m.name, pattern, prefix) or names_module(layout_module(m), pattern, prefix)
        ]
        if not hits:
            raise BergsonError(
                f"{option}: no module {pattern!r} in the store {store.root} (spelled from the model or its "
                f"base model, exact or a glob); its modules are "
                f"{some_names([m.name for m in manifest.modules], prefix)}"
            )
        out += [h for h in hits if h not in out]
    return out


def prepare_queries(
    queries: Any,
    segments: list[tuple[int, int]],
    total_dim: int,
    *,
    unit_norm: bool,
    reverse: bool,
) -> np.ndarray:
    """Validate queries and return them as float32 [Q, dim of the selected columns],
    normalized (``unit_norm``) and negated (``reverse``) as the search needs them."""
    if hasattr(queries, "detach"):  # a torch tensor, without importing torch
        queries = queries.detach().cpu().float().numpy()
    q = np.asarray(queries)
    if q.ndim == 1:
        q = q[None]
    if q.ndim != 2:
        raise BergsonError(f"queries must be [num_queries, dim] (or one [dim] vector), got shape {q.shape}")
    if q.shape[0] == 0:
        raise BergsonError("queries is empty (0 query vectors); pass at least one query gradient")
    if not np.issubdtype(q.dtype, np.number) or np.issubdtype(q.dtype, np.complexfloating):
        raise BergsonError(f"queries must be real numbers, got dtype {q.dtype}")
    width = sum(b - a for a, b in segments)
    if q.shape[1] != width:
        if q.shape[1] == total_dim and width != total_dim:
            q = np.concatenate([q[:, a:b] for a, b in segments], axis=1)
        else:
            extra = f" (or {total_dim}, the full row, to be sliced)" if width != total_dim else ""
            raise BergsonError(
                f"query dimension mismatch: expected {width} columns{extra}, got {q.shape[1]}; "
                "compute query gradients with the same modules and projection as the store "
                "(and pass modules= to search a subset)"
            )
    q = q.astype(np.float64)
    if not np.isfinite(q).all():
        bad = np.flatnonzero(~np.isfinite(q).all(axis=1))
        raise BergsonError(f"queries {bad[:5].tolist()} contain NaN or inf; check the query gradients")
    if unit_norm:
        q = unit_rows_np(q)
    if reverse:
        q = -q
    return np.ascontiguousarray(q, dtype=np.float32)


def warn_nonfinite_rows(store: Any, rows: list[int], action: str) -> None:
    """Say which stored rows hold non-finite values (a store written before the writer zeroed and
    recorded them) and what the search did with them."""
    ids = store.rows["row_id"][np.asarray(rows[:10])].tolist() if hasattr(store, "rows") else rows[:10]
    logger.warning(
        "%s: %d stored rows hold non-finite values (NaN or inf): dataset rows %s%s; they were %s. "
        "Run `bergson verify` on the store and rebuild it",
        getattr(store, "root", "the store"),
        len(rows),
        ids,
        ", ..." if len(rows) > 10 else "",
        action,
    )


def check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise BergsonError(f"k must be a positive integer (the number of results per query), got {k!r}")


def iter_blocks(store: GradientStore | np.ndarray, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    if isinstance(store, np.ndarray):
        for s in range(0, store.shape[0], block_rows):
            yield s, store[s : s + block_rows]
    else:
        yield from store.blocks(block_rows)


# ------------------------------------------------------------------------- search
_DENSE_BELOW = 32
"""Below this many queries the exact search scores whole blocks densely (:class:`BlockScorer`); from
it on, and with ``int8_rerank``, chunks keep only candidates (:mod:`bergson.search.scan`). Measured
on the 2-core machine: the candidate kernel is 1.1-1.4x faster at 64 queries and 0.7-0.9x at 1-16."""
_CHUNK_BYTES = 1 << 22
"""Size of the dense kernel's float32 conversion buffer."""
_SCORE_BYTES = 1 << 28
"""Upper bound on the dense kernel's [queries, block rows] float32 score buffer."""


class BlockScorer(SingleThreadedWorkers):
    """Scores store blocks against all queries: float32 [Q, b] per block.

    Each block is cut into cache-sized chunks; a chunk is converted to float32 into a
    per-thread buffer, multiplied by the queries and (with ``unit_norm``) divided by the
    rows' norms. Chunks are spread over ``num_threads`` workers that each run
    single-threaded kernels: independent workers keep going on a busy machine, where
    kernels that synchronise their threads on every call stall (measured 10-30x slower).
    """

    def __init__(
        self,
        queries: np.ndarray,
        segments: list[tuple[int, int]],
        total_dim: int,
        *,
        unit_norm: bool,
        block_rows: int,
        num_threads: int,
    ):
        import torch  # here, so that ``import bergson.search`` stays torch-free

        self.torch = torch
        self.queries_t = torch.from_numpy(np.ascontiguousarray(queries.T))  # [width, Q]
        self.num_q, self.width = queries.shape
        self.segments = segments
        self.whole = segments == [(0, total_dim)]
        self.unit_norm = unit_norm
        self.block_rows = block_rows
        self.chunk = min(block_rows, max(16, _CHUNK_BYTES // (4 * max(self.width, 1))))
        self.storage = torch.empty(self.num_q * block_rows, dtype=torch.float32)
        self.num_threads = num_threads
        self.local = threading.local()
        self.pool: ThreadPoolExecutor | None = None

    def _buffers(self) -> tuple[Any, Any]:
        bufs = getattr(self.local, "bufs", None)
        if bufs is None:
            torch = self.torch
            bufs = self.local.bufs = (
                torch.empty((self.chunk, self.width), dtype=torch.float32),
                torch.empty(self.num_q * self.chunk, dtype=torch.float32),
            )
        return bufs

    def _score_chunk(self, block: Any, scores: Any, s: int, e: int) -> None:
        torch = self.torch
        buf, out_storage = self._buffers()
        rows = buf[: e - s]
        gather_columns(rows, block, s, e, None if self.whole else self.segments)
        # rows x queries into a contiguous buffer, then copied transposed: 1.5x faster than
        # queries x rows for a single-threaded float32 matmul at 16 queries (an AVX-512 Xeon)
        out = out_storage[: self.num_q * (e - s)].view(e - s, self.num_q)
        torch.mm(rows, self.queries_t, out=out)
        if self.unit_norm:
            norms = torch.linalg.vector_norm(rows, dim=1)
            out.mul_(torch.where(norms > 0, norms.reciprocal(), 0.0)[:, None])
        scores[:, s:e].copy_(out.T)

    def __call__(self, block: np.ndarray) -> np.ndarray:
        """Scores [Q, b] of one block (a view of an internal buffer, valid until the next call)."""
        b = block.shape[0]
        tblock = block_tensor(self.torch, block)
        scores = self.storage[: self.num_q * b].view(self.num_q, b)  # contiguous [Q, b]
        starts = range(0, b, self.chunk)
        if self.pool is None or len(starts) == 1:
            for s in starts:
                self._score_chunk(tblock, scores, s, min(s + self.chunk, b))
        else:
            jobs = [
                self.pool.submit(self._score_chunk, tblock, scores, s, min(s + self.chunk, b)) for s in starts
            ]
            for job in jobs:
                job.result()
        return scores.numpy()


def exact_topk(
    store: StoreLike,
    queries: Any,
    k: int,
    *,
    unit_norm: bool = False,
    reverse: bool = False,
    modules: Sequence[str] | None = None,
    block_rows: int = _BLOCK_ROWS,
    num_threads: int | None = None,
    int8_rerank: int = 0,
    int8_prefilter: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` stored rows with the highest scores for each query, found exactly.

    Args:
        store: a GradientStore (``load_gradients(path)``), its path, or a 2-D array
            [rows, dim] of stored vectors.
        queries: query gradients [Q, dim] (or one [dim] vector), numpy or torch. With
            ``modules``, ``dim`` is the summed width of those modules, columns in the
            order given; a full-width query is also accepted and sliced the same way.
        k: results per query; larger than the number of rows returns every row.
        unit_norm: score by cosine similarity: queries and stored rows are normalized on
            the fly. All-zero rows (empty documents) score 0, never NaN.
        reverse: return the most negative scores first (the strongest opponents).
        modules: search only these modules' columns (names from the store's manifest).
        block_rows: rows read per block (each block is scored in cache-sized chunks;
            only candidates for the top-k leave a chunk).
        num_threads: worker threads (default: ``torch.get_num_threads()``). Each worker
            runs single-threaded kernels, so torch's intra-op thread count is set to 1
            during the call and restored afterwards.
        int8_rerank: 0 (default): exact. A factor F >= 1: scan an int8 copy of each row
            (one scale per row; queries likewise) with an integer matmul, keep the ``k * F``
            best rows per query by those approximate scores, and re-score them exactly in
            float32. Faster at many queries; the result is
            approximate: a row of the exact top-k is missed when its approximate score falls
            below ``k * F`` others (``benchmarks/search.py`` reports recall@k). Scores of the
            rows returned are exact. For a GradientStore the int8 copy is written once beside
            it (``<store>/int8/``, half the float16 bytes; said on the console) and reused while
            the store is unchanged; an array is quantized on the fly.
        int8_prefilter: exact search, faster at many queries: scan the store's int8 copy (written
            once as for ``int8_rerank``) with an integer matmul that gives every row a proven
            lower and upper bound on its score, and re-score in float32 only the rows whose upper
            bound reaches the k-th best lower bound (:mod:`bergson.search.int8_bound`). Returns
            what the float32 scan returns. Needs a GradientStore (not an array). Where the bound
            cannot be used (cosine scores over a subset of ``modules``, rows wider than 133,143
            columns, a store that cannot hold the copy, or scores too close together to narrow the
            search), the float32 scan runs instead and the console says why.

    Returns:
        ``(scores, indices)``: float32 [Q, min(k, rows)] and int64 [Q, min(k, rows)],
        best first. A score is the inner product of the query gradient and the row's
        gradient (cosine with ``unit_norm``): **positive means training on the row
        lowers the query's loss**. ``indices`` are store row positions (``store.rows``
        maps them to dataset rows). Equal scores are ordered by ascending row index.
        Rows whose score is not finite (stored NaN or inf values: the store writer
        stores such rows as zeros, but an older store or an array may hold them) are
        never returned, with a warning naming them; if that leaves fewer than ``k``,
        the rest is padded with index -1.

    Raises:
        BergsonError: empty queries, a query dimension that does not match the store,
            non-finite queries, k < 1, unknown modules.
    """
    check_k(k)
    if block_rows < 1:
        raise BergsonError(f"block_rows must be >= 1, got {block_rows}")
    if num_threads is not None and num_threads < 1:
        raise BergsonError(f"num_threads must be >= 1, got {num_threads}")
    if isinstance(int8_rerank, bool) or not isinstance(int8_rerank, (int, np.integer)) or int8_rerank < 0:
        raise BergsonError(
            f"int8_rerank must be 0 (exact search) or a factor >= 1 (candidates kept per result), "
            f"got {int8_rerank!r}"
        )
    st = open_store(store)
    segments, total = column_segments(st, modules)
    q = prepare_queries(queries, segments, total, unit_norm=unit_norm, reverse=reverse)
    n = store_rows(st)
    num_q = q.shape[0]
    kk = min(int(k), n)
    if kk == 0:
        return np.zeros((num_q, 0), np.float32), np.zeros((num_q, 0), np.int64)

    if num_threads is None:
        import torch

        num_threads = torch.get_num_threads()

    if int8_prefilter:
        found = _prefiltered_topk(st, q, segments, total, kk, int8_rerank, unit_norm, block_rows, num_threads)
        if found is not None:
            scores, indices = found
            return (-scores if reverse else scores), indices
    scan_k = min(kk * int8_rerank, n) if int8_rerank else kk
    top = TopK(num_q, scan_k)
    bad: list[int] = []
    if not int8_rerank and num_q < _DENSE_BELOW:
        return _dense_topk(st, q, segments, total, kk, unit_norm, reverse, block_rows, num_threads)
    copy = None
    if int8_rerank and not isinstance(st, np.ndarray):
        from .int8_copy import int8_copy

        copy = int8_copy(st)
        if copy is None:
            logger.warning("int8_rerank: quantizing the rows on the fly instead")
    with ChunkScanner(
        q,
        segments,
        total,
        k=scan_k,
        unit_norm=unit_norm,
        num_threads=num_threads,
        int8=bool(int8_rerank),
        chunk_rows=None if copy is None else chunk_rows_for(q.shape[1], num_q, int8=True),
    ) as scan:
        if copy is not None:
            rows8, scales8 = copy.rows, copy.scales
            for first in range(0, n, block_rows):
                part = slice(first, first + block_rows)
                (qs, rows, scores), block_bad = scan(rows8[part], first, top.scores[:, -1], scales8[part])
                top.push_candidates(qs, rows, scores)
                bad += block_bad
        else:
            for first, block in iter_blocks(st, block_rows):
                (qs, rows, scores), block_bad = scan(block, first, top.scores[:, -1])
                top.push_candidates(qs, rows, scores)
                bad += block_bad
        top.indices[top.indices == EMPTY] = -1
        if copy is not None:  # copy rows -> store rows
            top.indices = np.where(top.indices >= 0, copy.order[np.maximum(top.indices, 0)], -1)
            bad = sorted(copy.order[np.asarray(bad, np.int64)].tolist())
        if int8_rerank:  # inside: single-threaded kernels here too
            top.scores, top.indices = rescore(st, q, segments, top.indices, kk, unit_norm=unit_norm)
    if bad:
        warn_nonfinite_rows(st, bad, "left out of the ranking")
    return (-top.scores if reverse else top.scores), top.indices


def _prefiltered_topk(
    st: Any,
    q: np.ndarray,
    segments: list[tuple[int, int]],
    total: int,
    kk: int,
    int8_rerank: int,
    unit_norm: bool,
    block_rows: int,
    num_threads: int,
) -> tuple[np.ndarray, np.ndarray] | None:
    """``exact_topk(int8_prefilter=True)``: the exact top-k through the int8 copy's bounds, or None
    (said on the console) where the float32 scan has to answer instead."""
    from .int8_bound import MAX_CANDIDATES, MAX_DIM, TooManyCandidates, bounded_topk
    from .int8_copy import int8_copy

    if int8_rerank:
        raise BergsonError(
            "int8_prefilter and int8_rerank exclude each other: int8_prefilter returns the exact "
            "top-k, int8_rerank an approximate one; pass one of them"
        )
    if isinstance(st, np.ndarray):
        raise BergsonError(
            "int8_prefilter needs a GradientStore (its int8 copy is written beside it), not an array; "
            "pass the store or its path, or leave int8_prefilter off"
        )
    width = sum(b - a for a, b in segments)
    why = None
    if unit_norm and segments != [(0, total)]:
        why = (
            "cosine scores over a subset of modules need norms of those columns, which the copy does not hold"
        )
    elif width > MAX_DIM:
        why = f"rows of {width} columns could overflow the int32 products (at most {MAX_DIM})"
    copy = None if why else int8_copy(st, option="int8_prefilter")
    if why is None and copy is None:
        why = "the int8 copy could not be written"
    if copy is not None:
        try:
            scores, indices, bad = bounded_topk(
                st,
                copy,
                q,
                segments,
                total,
                kk,
                unit_norm=unit_norm,
                num_threads=num_threads,
                block_rows=block_rows,
            )
        except TooManyCandidates:
            why = f"the scores are too close together for the bounds to keep fewer than {MAX_CANDIDATES} candidates"
        else:
            if bad:
                warn_nonfinite_rows(st, bad, "left out of the ranking")
            return scores, indices
    logger.warning("int8_prefilter: %s; scanning in float32 instead (same results, slower)", why)
    return None


def _dense_topk(
    st: Any,
    q: np.ndarray,
    segments: list[tuple[int, int]],
    total: int,
    kk: int,
    unit_norm: bool,
    reverse: bool,
    block_rows: int,
    num_threads: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k with whole blocks scored densely and merged by :meth:`TopK.push`."""
    num_q = q.shape[0]
    block_rows = max(1, min(block_rows, _SCORE_BYTES // (4 * num_q)))
    top = TopK(num_q, kk)
    bad: list[int] = []
    with BlockScorer(
        q, segments, total, unit_norm=unit_norm, block_rows=block_rows, num_threads=num_threads
    ) as score:
        for first, block in iter_blocks(st, block_rows):
            scores = score(block)
            if not np.isfinite(scores).all():
                # a row with NaN or inf values (a store written before the writer zeroed them):
                # never ranked (an inf would rank first), and said
                cols = np.flatnonzero(~np.isfinite(scores).all(axis=0))
                scores[:, cols] = -np.inf  # not NaN: np.partition ranks NaN above every score
                bad += (cols + first).tolist()
            top.push(scores, first)
    if bad:
        warn_nonfinite_rows(st, bad, "left out of the ranking")
    top.indices[top.indices == EMPTY] = -1
    return (-top.scores if reverse else top.scores), top.indices
