"""Approximate (or exact, with "Flat") search through FAISS indices kept beside a store.

An index is built once from a gradient store and saved under
``<store>/faiss/<sanitized factory>-<unit|raw>/``: one ``.faiss`` file per shard (a
contiguous range of rows) and a ``manifest.json`` that records the factory string, the
normalization, the shards and a fingerprint of the store's manifest. Later opens reuse
it; a changed store (or other build options) triggers a rebuild. Files are written
under temporary names and renamed into place, and the index manifest is written last,
so a reader never sees a half-built index.

Scores have the same orientation as :func:`bergson.search.exact_topk`: the inner
product of query and stored gradients (cosine with ``unit_norm``), **positive means
training on the row lowers the query's loss**. Indices always use the inner-product
metric.

This module does not import torch, and imports faiss only when an index is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import FaissConfig
from ..core.rows import unit_rows_np
from ..errors import BergsonError
from .exact import check_k, prepare_queries, warn_nonfinite_rows

if TYPE_CHECKING:
    from ..store.reader import GradientStore

logger = logging.getLogger(__name__)

INDEX_FORMAT_VERSION = 1
INDEX_MANIFEST = "manifest.json"
TRAIN_SEED = 0
_MISSING = -1


def import_faiss() -> Any:
    try:
        import faiss
    except ImportError as e:
        raise BergsonError(
            "FAISS is not installed; run `pip install 'bergson[faiss]'` (or install faiss-gpu for GPUs)"
        ) from e
    return faiss


def _num_gpus(faiss: Any) -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def sanitize(factory: str) -> str:
    """A directory-safe name for a factory string ("IVF1024,Flat" -> "IVF1024_Flat")."""
    return re.sub(r"[^A-Za-z0-9.+=-]+", "_", factory).strip("_") or "index"


def store_fingerprint(store: GradientStore) -> str:
    """SHA-256 of the store's manifest file: any change to the store changes it."""
    return hashlib.sha256((store.root / "manifest.json").read_bytes()).hexdigest()


def index_dir(store: GradientStore, index_factory: str, unit_norm: bool) -> Path:
    return store.root / "faiss" / f"{sanitize(index_factory)}-{'unit' if unit_norm else 'raw'}"


def shard_bounds(num_rows: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal row ranges [start, stop)."""
    cuts = [num_rows * i // num_shards for i in range(num_shards + 1)]
    return list(itertools.pairwise(cuts))


def as_float32_rows(rows: np.ndarray, unit_norm: bool) -> np.ndarray:
    """Rows as contiguous float32, unit-normalized if asked (all-zero rows stay zero); rows
    holding a non-finite value become zeros (:func:`_build_shard` says which)."""
    x = np.ascontiguousarray(rows, dtype=np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        x[bad] = 0.0
    if unit_norm:
        x = unit_rows_np(x)
    return x


def _validate(cfg: FaissConfig, num_rows: int) -> None:
    if num_rows == 0:
        raise BergsonError("the store has no rows; there is nothing to index")
    if not cfg.index_factory.strip():
        raise BergsonError('--index_factory is empty; pass a FAISS factory string such as "Flat"')
    if cfg.nprobe < 1:
        raise BergsonError(f"--nprobe must be >= 1, got {cfg.nprobe}")
    if cfg.num_shards < 1:
        raise BergsonError(f"--num_shards must be >= 1, got {cfg.num_shards}")
    if cfg.num_shards > max(num_rows, 1):
        raise BergsonError(
            f"--num_shards {cfg.num_shards} exceeds the store's {num_rows} rows; pass a smaller --num_shards"
        )
    if cfg.max_train_examples is not None and cfg.max_train_examples < 1:
        raise BergsonError(f"--max_train_examples must be >= 1 (or unset), got {cfg.max_train_examples}")


def _fsync_replace(tmp: Path, dest: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dest)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    _fsync_replace(tmp, path)


class FaissIndex:
    """A FAISS index over one gradient store, possibly split into row-range shards.

    Open one with :func:`load_or_build_index`; query it with :meth:`search`.
    """

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        shards: list[tuple[int, int, Any]],
        cfg: FaissConfig,
        unit_norm: bool,
    ):
        self.path = path
        """The index directory."""
        self.manifest = manifest
        self.shards = shards
        """(first row, stop row, faiss index) per shard."""
        self.cfg = cfg
        self.unit_norm = unit_norm
        self.built = False
        """True when this open built the index, False when it reused one from disk."""

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def num_rows(self) -> int:
        return int(self.manifest["num_rows"])

    def __repr__(self) -> str:
        return (
            f"FaissIndex({str(self.path)!r}, factory={self.cfg.index_factory!r}, rows={self.num_rows}, "
            f"shards={len(self.shards)}, unit_norm={self.unit_norm})"
        )

    def set_nprobe(self, nprobe: int) -> None:
        """Inverted lists visited per query (no effect on indices without an IVF stage)."""
        if nprobe < 1:
            raise BergsonError(f"--nprobe must be >= 1, got {nprobe}")
        faiss = import_faiss()
        self.cfg.nprobe = nprobe
        for _, _, index in self.shards:
            with contextlib.suppress(RuntimeError):  # not an IVF index
                faiss.extract_index_ivf(index).nprobe = nprobe

    def search(self, queries: Any, k: int, *, reverse: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best rows per query, as in :func:`bergson.search.exact_topk`.

        Returns ``(scores, indices)``: float32 and int64 [Q, min(k, rows)], best first,
        with global store row indices. Scores are inner products of gradients (cosines if
        the index was built with ``unit_norm``); positive means training on the row lowers
        the query's loss. ``reverse=True`` returns the most negative scores first (the
        index is searched with negated queries). An approximate index that finds fewer
        than ``k`` rows in the lists it probes pads with index -1 and score -inf (+inf
        with ``reverse``).
        """
        check_k(k)
        total = self.dim
        q = prepare_queries(queries, [(0, total)], total, unit_norm=self.unit_norm, reverse=reverse)
        kk = min(int(k), self.num_rows)
        parts_s, parts_i = [], []
        for start, _, index in self.shards:
            ks = min(kk, int(index.ntotal))
            if ks == 0:
                continue
            d, i = index.search(q, ks)
            valid = i != _MISSING
            parts_s.append(np.where(valid, d, -np.inf).astype(np.float32))
            parts_i.append(np.where(valid, i + start, _MISSING).astype(np.int64))
        all_s = np.concatenate(parts_s, axis=1)
        all_i = np.concatenate(parts_i, axis=1)
        # Best score first; equal scores by ascending row; missing results last.
        missing = all_i == _MISSING
        order = np.lexsort((np.where(missing, np.iinfo(np.int64).max, all_i), -all_s), axis=-1)[:, :kk]
        scores = np.take_along_axis(all_s, order, axis=1)
        indices = np.take_along_axis(all_i, order, axis=1)
        return (-scores if reverse else scores), indices


def _expected_manifest(
    store: GradientStore, cfg: FaissConfig, unit_norm: bool, faiss_version: str
) -> dict[str, Any]:
    return {
        "format_version": INDEX_FORMAT_VERSION,
        "factory": cfg.index_factory,
        "metric": "inner_product",
        "normalization": "unit" if unit_norm else "raw",
        "num_shards": cfg.num_shards,
        "max_train_examples": cfg.max_train_examples,
        "train_seed": TRAIN_SEED,
        "store_fingerprint": store_fingerprint(store),
        "dim": store.manifest.total_dim,
        "num_rows": len(store),
        "faiss_version": faiss_version,
    }


_IDENTITY_KEYS = (
    "format_version",
    "factory",
    "metric",
    "normalization",
    "num_shards",
    "max_train_examples",
    "train_seed",
    "store_fingerprint",
    "dim",
    "num_rows",
)


def _read_existing(path: Path, expected: dict[str, Any]) -> dict[str, Any] | None:
    """The saved index manifest if it matches ``expected`` and all its files exist."""
    try:
        saved = json.loads((path / INDEX_MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(saved, dict):
        return None
    stale = [key for key in _IDENTITY_KEYS if saved.get(key) != expected[key]]
    if stale:
        logger.info("rebuilding the FAISS index in %s (changed: %s)", path, ", ".join(stale))
        return None
    shards = saved.get("shards")
    if not isinstance(shards, list) or not all(
        isinstance(s, dict) and isinstance(s.get("file"), str) and (path / s["file"]).is_file()
        for s in shards
    ):
        return None
    return saved


def _train_rows(store: GradientStore, start: int, stop: int, limit: int, unit_norm: bool) -> np.ndarray:
    n = stop - start
    if limit >= n:
        idx = np.arange(start, stop)
    else:
        rng = np.random.default_rng(TRAIN_SEED + start)
        idx = np.sort(rng.choice(n, size=limit, replace=False)) + start
    data = store.all
    return as_float32_rows(np.asarray(data[idx]), unit_norm)


def _build_shard(
    faiss: Any,
    store: GradientStore,
    cfg: FaissConfig,
    start: int,
    stop: int,
    unit_norm: bool,
    block_rows: int,
) -> Any:
    dim = store.manifest.total_dim
    try:
        index = faiss.index_factory(dim, cfg.index_factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise BergsonError(
            f"--index_factory {cfg.index_factory!r} is not a FAISS factory string FAISS can parse "
            f"for dimension {dim} ({str(e).splitlines()[-1][-200:]}); try 'Flat' or 'IVF1024,Flat'"
        ) from None
    work = index
    if _num_gpus(faiss) > 0:
        try:
            work = faiss.index_cpu_to_all_gpus(index)
        except RuntimeError:
            logger.info("%s has no GPU implementation; building on the CPU", cfg.index_factory)
    if not work.is_trained:
        try:
            nlist = int(faiss.extract_index_ivf(index).nlist)
        except RuntimeError:
            nlist = 0
        limit = cfg.max_train_examples or max(256 * nlist, 65536)
        train = _train_rows(store, start, stop, limit, unit_norm)
        try:
            work.train(train)
        except RuntimeError as e:
            raise BergsonError(
                f"training the FAISS index {cfg.index_factory!r} on {len(train)} rows failed "
                f"({str(e).splitlines()[-1][-200:]}); use fewer IVF lists, more --max_train_examples, "
                "or fewer --num_shards"
            ) from None
        del train
    bad: list[int] = []
    for first, block in store.blocks(block_rows):
        a, b = max(first, start), min(first + len(block), stop)
        if a < b:
            rows = block[a - first : b - first]
            bad += (np.flatnonzero(~np.isfinite(rows).all(axis=1)) + a).tolist()
            work.add(as_float32_rows(rows, unit_norm))
    if bad:
        warn_nonfinite_rows(store, bad, "indexed as zeros")
    return faiss.index_gpu_to_cpu(work) if work is not index else index


def _load_shards(faiss: Any, path: Path, manifest: dict[str, Any], cfg: FaissConfig) -> list:
    flags = faiss.IO_FLAG_MMAP if cfg.mmap_index else 0
    shards = []
    use_gpu = _num_gpus(faiss) > 0 and not cfg.mmap_index
    for s in manifest["shards"]:
        index = faiss.read_index(str(path / s["file"]), flags)
        if use_gpu:
            with contextlib.suppress(RuntimeError):  # no GPU implementation: stay on the CPU
                index = faiss.index_cpu_to_all_gpus(index)
        shards.append((int(s["start"]), int(s["stop"]), index))
    return shards


def load_or_build_index(
    store: GradientStore | str | Path,
    cfg: FaissConfig | None = None,
    *,
    unit_norm: bool = False,
    rebuild: bool = False,
    block_rows: int = 65536,
) -> FaissIndex:
    """Open the FAISS index for ``store`` described by ``cfg``, building it if needed.

    The index lives in ``<store>/faiss/<factory>-<unit|raw>/``. It is rebuilt when it is
    missing, when the store's manifest changed since it was built, when the build options
    (factory, shards, training rows) differ, or when ``rebuild=True``. ``unit_norm``
    normalizes stored rows (and, at search time, queries) so that scores are cosines;
    all-zero rows stay zero and score 0.
    """
    from ..store.reader import GradientStore, load_gradients

    cfg = replace(cfg) if cfg is not None else FaissConfig()  # a copy: set_nprobe changes it
    if isinstance(store, np.ndarray):
        raise BergsonError(
            "FAISS indices are saved beside a store; pass a GradientStore or its path "
            "(or use exact_topk for a plain array)"
        )
    st = store if isinstance(store, GradientStore) else load_gradients(store)
    _validate(cfg, len(st))
    faiss = import_faiss()
    path = index_dir(st, cfg.index_factory, unit_norm)
    expected = _expected_manifest(st, cfg, unit_norm, faiss.__version__)
    saved = None if rebuild else _read_existing(path, expected)
    built = saved is None
    if saved is None:
        saved = _build(faiss, st, cfg, unit_norm, path, expected, block_rows)
    index = FaissIndex(path, saved, _load_shards(faiss, path, saved, cfg), cfg, unit_norm)
    index.built = built
    index.set_nprobe(cfg.nprobe)
    return index


def _build(
    faiss: Any,
    store: GradientStore,
    cfg: FaissConfig,
    unit_norm: bool,
    path: Path,
    expected: dict[str, Any],
    block_rows: int,
) -> dict[str, Any]:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BergsonError(
            f"cannot create the FAISS index directory {path} ({e}); make the store writable"
        ) from None
    build_id = hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()[:12]
    shards = []
    for i, (start, stop) in enumerate(shard_bounds(len(store), cfg.num_shards)):
        logger.info(
            "building FAISS %s shard %d/%d (rows %d-%d)",
            cfg.index_factory,
            i + 1,
            cfg.num_shards,
            start,
            stop,
        )
        index = _build_shard(faiss, store, cfg, start, stop, unit_norm, block_rows)
        name = f"shard-{i:05d}-{build_id}.faiss"
        tmp = path / f".{name}.{os.getpid()}.tmp"
        faiss.write_index(index, str(tmp))
        _fsync_replace(tmp, path / name)
        shards.append({"file": name, "start": start, "stop": stop, "rows": int(index.ntotal)})
        del index
    manifest = {**expected, "shards": shards}
    _write_json_atomic(path / INDEX_MANIFEST, manifest)
    keep = {s["file"] for s in shards}
    for f in path.glob("*.faiss"):
        if f.name not in keep:
            f.unlink(missing_ok=True)
    return manifest


def faiss_topk(
    store: GradientStore | str | Path,
    queries: Any,
    k: int,
    cfg: FaissConfig | None = None,
    *,
    unit_norm: bool = False,
    reverse: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Build or reuse the index for ``store`` and search it once (see :meth:`FaissIndex.search`)."""
    return load_or_build_index(store, cfg, unit_norm=unit_norm).search(queries, k, reverse=reverse)


def remove_indices(store: GradientStore | str | Path) -> None:
    """Delete every FAISS index saved beside ``store``."""
    root = store.root if not isinstance(store, (str, Path)) else Path(store)
    shutil.rmtree(root / "faiss", ignore_errors=True)
