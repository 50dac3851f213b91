"""What a store's rows say about the run that wrote them: rows whose vectors were not finite
(stored as zeros) and rows whose norm is far above the others' (outliers that can dominate every
score), recorded in the manifest (``nonfinite``, ``norms``) and said on the console."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .integrity import shard_record

logger = logging.getLogger(__name__)

OUTLIER_FACTOR = 10.0
"""A row is an outlier when its norm is above this many times the median norm of the rows."""
MAX_LISTED = 1000
"""At most this many row ids are listed in the manifest (the counts are exact)."""


def row_norms(array: Any, block_rows: int = 1024) -> np.ndarray:
    """Euclidean norm of every row of a [rows, dim] array (memory-mapped), read in blocks."""
    out = np.zeros(array.shape[0], np.float32)
    for s in range(0, array.shape[0], block_rows):
        out[s : s + block_rows] = np.linalg.norm(np.asarray(array[s : s + block_rows], np.float64), axis=1)
    return out


def _listed(ids: Any) -> dict[str, Any]:
    ids = [int(i) for i in ids]
    return {"count": len(ids), "row_ids": ids[:MAX_LISTED], "listed_all": len(ids) <= MAX_LISTED}


def norm_outliers(row_ids: np.ndarray, norms: np.ndarray, factor: float = OUTLIER_FACTOR) -> dict[str, Any]:
    """The median of the rows' nonzero norms (zero rows are documents without a loss token) and
    the rows above ``factor`` times it."""
    nonzero = norms[norms > 0]
    median = float(np.median(nonzero)) if len(nonzero) else 0.0
    above = row_ids[norms > factor * median] if median > 0 else row_ids[:0]
    return {"median": median, "outlier_factor": factor, "outliers": _listed(above)}


def _shard_norms(root: Path, shards: list[str], tables: list[Any]) -> Iterator[np.ndarray]:
    for name, table in zip(shards, tables):
        if "norm" in table.column_names:
            yield table["norm"].to_numpy().astype(np.float32)
        else:  # a shard written before norms were recorded (a resumed build)
            yield row_norms(np.load(root / f"{name}.npy", mmap_mode="r", allow_pickle=False))


def health_records(
    root: Path, shards: list[str], tables: list[Any], kind: str
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The manifest's ``nonfinite`` and ``norms`` records of a store whose shards are complete
    (``norms`` is None for a scores store: its rows are scores, not gradients)."""
    bad: list[int] = []
    unknown = 0
    for table in tables:
        record = shard_record(table)
        if "nonfinite_rows" in record:
            bad += record["nonfinite_rows"]
        else:
            unknown += table.num_rows
    nonfinite = {**_listed(sorted(bad)), "action": "stored as zeros"}
    if unknown:
        nonfinite["rows_not_checked"] = unknown  # shards written before the check (a resumed build)
    if kind == "scores":
        return nonfinite, None
    row_ids = np.concatenate([t["row_id"].to_numpy() for t in tables]) if tables else np.zeros(0, np.int64)
    norms = np.concatenate(list(_shard_norms(root, shards, tables))) if tables else np.zeros(0, np.float32)
    return nonfinite, norm_outliers(row_ids, norms)


def log_health(root: Path, manifest: Any) -> None:
    """Say on the console what the records of a just-completed store hold."""
    nonfinite = manifest.nonfinite or {}
    if nonfinite.get("count"):
        logger.warning(
            "%s: %d rows had non-finite values (NaN or inf) and are stored as zeros (dataset rows %s%s), "
            "listed in manifest.json (nonfinite); a loss overflowing in half precision is the usual "
            "cause: rebuild with --precision fp32",
            root,
            nonfinite["count"],
            nonfinite["row_ids"][:10],
            ", ..." if nonfinite["count"] > 10 else "",
        )
    outliers = (manifest.norms or {}).get("outliers") or {}
    if outliers.get("count"):
        logger.warning(
            "%s: %d rows have a norm above %gx the median row norm (%.4g): dataset rows %s%s, listed in "
            "manifest.json (norms); such rows can dominate every score",
            root,
            outliers["count"],
            manifest.norms["outlier_factor"],
            manifest.norms["median"],
            outliers["row_ids"][:10],
            ", ..." if outliers["count"] > 10 else "",
        )
