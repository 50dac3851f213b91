"""An int8 copy of a store's rows, written once beside the store for ``int8_rerank`` searches.

``<store>/int8/`` holds ``rows.npy`` (int8 [rows, total_dim]: each row scaled so that its largest
magnitude is 127, then rounded), ``scales.npy`` (float32 [rows]: that largest magnitude; NaN for
a row holding non-finite values, whose int8 row is zeros), ``bounds.npy`` (float32 [rows, 3]: per
row the norm of its int8 values, an upper bound on the norm of its rounding error in int8 units,
and the norm of the stored row; what :mod:`bergson.search.int8_bound` needs to bound every score),
``order.npy`` (int64 [rows]: the store row each copy row holds) and ``meta.json`` (the SHA-256 of
the store's manifest when the copy was written). A copy whose fingerprint no longer matches the
store is rewritten. It takes half the store's float16 bytes and spares every later search the
quantization (an integer matmul reads the int8 rows directly).

Within each block of :data:`SORT_ROWS` store rows, the copy holds the rows in descending order of
their scale (rows with non-finite values last). So a chunk of consecutive copy rows has nearly one
scale, and the bounded search compares its integer products with one integer threshold per query;
and it meets the rows with the largest scores early, which raises its thresholds early (see
:mod:`bergson.search.int8_bound`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from ..store.reader import GradientStore

logger = logging.getLogger(__name__)

INT8_DIR = "int8"
_FORMAT = 3
"""1: rows and scales; 2: and the per-row bounds; 3: and rows sorted by scale within blocks (a copy
of an older format is rewritten)."""

SORT_ROWS = 1 << 18
"""Store rows per block whose copy rows are sorted by scale (fewer for rows wider than 256)."""


class Int8Copy(NamedTuple):
    rows: np.ndarray
    """int8 [rows, total_dim], memory-mapped: ``round(127 * x / scale)``."""
    scales: np.ndarray
    """float32 [rows]: each row's largest magnitude (NaN: the row holds non-finite values)."""
    bounds: np.ndarray
    """float32 [rows, 3]: ``||r||``, an upper bound on ``||127 * x / scale - r||`` and ``||x||``
    (r the int8 row, x the stored row as float32)."""
    order: np.ndarray
    """int64 [rows]: the store row of each copy row (a permutation within blocks of ``SORT_ROWS``,
    by descending scale)."""


_MAPPED: weakref.WeakKeyDictionary[GradientStore, tuple[str, Int8Copy]] = weakref.WeakKeyDictionary()
"""Each open store's mapped int8 copy, with the store fingerprint it was written for."""


def _fingerprint(store: GradientStore) -> str:
    import hashlib

    return hashlib.sha256((store.root / "manifest.json").read_bytes()).hexdigest()


def load_int8_copy(store: GradientStore) -> Int8Copy | None:
    """The store's current int8 copy, or None when there is none or it was written for another
    state of the store (or in an older format)."""
    root = store.root / INT8_DIR
    try:
        meta = json.loads((root / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("format") != _FORMAT or meta.get("store_fingerprint") != _fingerprint(store):
        return None
    # kept on the store while its manifest is unchanged: a fresh mapping would fault its pages in
    # again on every search (about a tenth of a repeated int8 search's time)
    cached = _MAPPED.get(store)
    if cached is not None and cached[0] == meta["store_fingerprint"]:
        return cached[1]
    rows = np.load(root / "rows.npy", mmap_mode="r")
    scales = np.load(root / "scales.npy")
    bounds = np.load(root / "bounds.npy")
    order = np.load(root / "order.npy")
    n = len(store)
    shapes = (rows.shape, scales.shape, bounds.shape, order.shape)
    if shapes != ((n, store.manifest.total_dim), (n,), (n, 3), (n,)):
        return None
    copy = Int8Copy(rows, scales, bounds, order)
    _MAPPED[store] = (meta["store_fingerprint"], copy)
    return copy


def write_int8_copy(store: GradientStore, block_rows: int | None = None) -> Path:
    """Quantize every row of ``store`` into ``<store>/int8/`` (written under a temporary name,
    then renamed, so a reader never sees half a copy), each block of ``block_rows`` rows sorted
    by scale. Returns the directory."""
    import torch

    final = store.root / INT8_DIR
    tmp = store.root / f"{INT8_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    n, dim = len(store), store.manifest.total_dim
    if block_rows is None:  # a block of float32 rows in memory: at most 256 MiB
        block_rows = max(1024, min(SORT_ROWS, (256 << 20) // (4 * max(dim, 1))))
    rows = np.lib.format.open_memmap(tmp / "rows.npy", mode="w+", dtype=np.int8, shape=(n, dim))
    scales = np.empty(n, np.float32)
    bounds = np.empty((n, 3), np.float32)
    order = np.empty(n, np.int64)
    for first, block in store.blocks(block_rows):
        x = torch.from_numpy(np.asarray(block, np.float32))
        amax = x.abs().amax(dim=1)
        finite = torch.isfinite(x).all(dim=1)
        inv = torch.where(finite & (amax > 0), 127.0 / amax, 0.0)
        q = (x.nan_to_num(0.0, 0.0, 0.0) * inv[:, None]).round_().to(torch.int8)
        scale = torch.where(finite, amax, torch.nan).numpy()
        perm = np.argsort(np.where(np.isnan(scale), np.inf, -scale), kind="stable")
        part = slice(first, first + len(block))
        rows[part] = q.numpy()[perm]
        scales[part] = scale[perm]
        bounds[part] = _row_bounds(x, inv, q).numpy()[perm]
        order[part] = first + perm
    rows.flush()
    del rows
    np.save(tmp / "scales.npy", scales)
    np.save(tmp / "bounds.npy", bounds)
    np.save(tmp / "order.npy", order)
    meta = {"format": _FORMAT, "store_fingerprint": _fingerprint(store), "rows": n, "dim": dim}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def _row_bounds(x: Any, inv: Any, r: Any) -> Any:
    """float32 [rows, 3] of a block: ``||r||``, a bound on ``||127 x / scale - r||`` and ``||x||``.

    The rounding error is measured in float32: ``x * inv`` (at most 127 in magnitude) is within
    two float32 roundings of ``127 x / scale`` and the subtraction adds one more, so each entry is
    off by less than 3e-5; the norm is padded by that much per entry and a relative 1e-5. Rows with
    non-finite values get zeros (they are never ranked)."""
    import torch

    rf = r.float()
    clean = x.nan_to_num(0.0, 0.0, 0.0) * (inv > 0)[:, None]
    resid = clean * inv[:, None] - rf
    dim = x.shape[1]
    rnorm = torch.linalg.vector_norm(rf, dim=1) * (1 + 1e-6)
    dnorm = torch.linalg.vector_norm(resid, dim=1) * (1 + 1e-5) + 3e-5 * dim**0.5
    xnorm = torch.linalg.vector_norm(clean, dim=1)
    return torch.stack([rnorm, dnorm, xnorm], dim=1)


def int8_copy(store: GradientStore, option: str = "int8_rerank") -> Int8Copy | None:
    """The store's current int8 copy, written first when there is none (said on the console, with
    ``option`` as the reason), or None when it cannot be written (a read-only store: said; the
    caller says what it does instead)."""
    found = load_int8_copy(store)
    if found is not None:
        return found
    size = len(store) * store.manifest.total_dim / 1e6
    logger.warning(
        "%s: writing an int8 copy of %s's rows to %s (%.0f MB, once; reused while the store is unchanged)",
        option,
        store.root,
        store.root / INT8_DIR,
        size,
    )
    try:
        write_int8_copy(store)
    except OSError as e:
        logger.warning("%s: could not write the int8 copy (%s)", option, e)
        return None
    return load_int8_copy(store)
