"""An int8 copy of a store's rows, written once beside the store for ``int8_rerank`` searches.

``<store>/int8/`` holds ``rows.npy`` (int8 [rows, total_dim]: each row scaled so that its largest
magnitude is 127, then rounded), ``scales.npy`` (float32 [rows]: that largest magnitude; NaN for
a row holding non-finite values, whose int8 row is zeros) and ``meta.json`` (the SHA-256 of the
store's manifest when the copy was written). A copy whose fingerprint no longer matches the
store is rewritten. It takes half the store's float16 bytes and spares every later search the
quantization (an integer matmul reads the int8 rows directly).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..store.reader import GradientStore

logger = logging.getLogger(__name__)

INT8_DIR = "int8"
_FORMAT = 1
_MAPPED: weakref.WeakKeyDictionary[GradientStore, tuple[str, tuple[np.ndarray, np.ndarray]]] = (
    weakref.WeakKeyDictionary()
)
"""Each open store's mapped int8 copy, with the store fingerprint it was written for."""


def _fingerprint(store: GradientStore) -> str:
    import hashlib

    return hashlib.sha256((store.root / "manifest.json").read_bytes()).hexdigest()


def load_int8_copy(store: GradientStore) -> tuple[np.ndarray, np.ndarray] | None:
    """(int8 rows [rows, total_dim], memory-mapped; float32 scales [rows]) of a current copy, or
    None when there is none or it was written for another state of the store."""
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
    if rows.shape != (len(store), store.manifest.total_dim) or scales.shape != (len(store),):
        return None
    _MAPPED[store] = (meta["store_fingerprint"], (rows, scales))
    return rows, scales


def write_int8_copy(store: GradientStore, block_rows: int = 65536) -> Path:
    """Quantize every row of ``store`` into ``<store>/int8/`` (written under a temporary name,
    then renamed, so a reader never sees half a copy). Returns the directory."""
    import torch

    final = store.root / INT8_DIR
    tmp = store.root / f"{INT8_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    n, dim = len(store), store.manifest.total_dim
    rows = np.lib.format.open_memmap(tmp / "rows.npy", mode="w+", dtype=np.int8, shape=(n, dim))
    scales = np.empty(n, np.float32)
    for first, block in store.blocks(block_rows):
        x = torch.from_numpy(np.asarray(block, np.float32))
        amax = x.abs().amax(dim=1)
        finite = torch.isfinite(x).all(dim=1)
        inv = torch.where(finite & (amax > 0), 127.0 / amax, 0.0)
        q = (x.nan_to_num(0.0, 0.0, 0.0) * inv[:, None]).round_().to(torch.int8)
        rows[first : first + len(block)] = q.numpy()
        scales[first : first + len(block)] = torch.where(finite, amax, torch.nan).numpy()
    rows.flush()
    del rows
    np.save(tmp / "scales.npy", scales)
    meta = {"format": _FORMAT, "store_fingerprint": _fingerprint(store), "rows": n, "dim": dim}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def int8_copy(store: GradientStore) -> tuple[np.ndarray, np.ndarray] | None:
    """The store's current int8 copy, written first when there is none (said on the console), or
    None when it cannot be written (a read-only store: said, and the search quantizes on the fly)."""
    found = load_int8_copy(store)
    if found is not None:
        return found
    size = len(store) * store.manifest.total_dim / 1e6
    logger.warning(
        "int8_rerank: writing an int8 copy of %s's rows to %s (%.0f MB, once; reused while the store "
        "is unchanged)",
        store.root,
        store.root / INT8_DIR,
        size,
    )
    try:
        write_int8_copy(store)
    except OSError as e:
        logger.warning("int8_rerank: could not write the int8 copy (%s); quantizing rows on the fly", e)
        return None
    return load_int8_copy(store)
