"""``bergson verify STORE``: every check a store's files can be put to, each bad file named.

The manifest must be readable and complete; every shard's ``.npy`` (and ``.tokens.npy``) must
hold the dtype, width and rows the manifest and the rows' metadata say, match the sha256 recorded
when it was written, and hold finite values only; every ``.rows.parquet`` must be readable and
match its checksum. Readers run the cheap part (sizes and counts) on open
(:mod:`bergson.store.integrity`); this reads every byte once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BergsonError
from .integrity import check_array, npy_header, read_rows_table, sha256_file
from .legacy import is_legacy_store
from .manifest import MANIFEST, read_manifest
from .writer import TOKENS


@dataclass
class VerifyReport:
    """What :func:`verify_store` found. ``ok`` is False when any file is damaged: ``problems``
    then says which (one line each, naming the file)."""

    path: str
    problems: list[str] = field(default_factory=list)
    """One line per damaged file or value, naming the file."""
    notes: list[str] = field(default_factory=list)
    """What is worth knowing but is no damage: rows stored as zeros at write time, norm outliers,
    checks a store of an older format cannot have."""
    shards: int = 0
    rows: int = 0
    checksums: int = 0
    """Files whose sha256 matched the one recorded at write time."""
    nonfinite_rows: list[int] = field(default_factory=list)
    """Dataset rows whose stored values are not finite (NaN or inf)."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        head = (
            f"{self.path}: {'ok' if self.ok else 'DAMAGED'}: {self.shards} shards, {self.rows} rows, "
            f"{self.checksums} checksums matched"
        )
        lines = [head] + [f"  problem: {p}" for p in self.problems] + [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _scan_npy(path: Path, width: int, record: list[int], row_ids: np.ndarray | None) -> str:
    """The sha256 of a checked ``.npy`` file, reading it once; the ids of rows holding a
    non-finite value are appended to ``record`` (``row_ids`` maps rows to dataset rows; None: the
    file's rows are token rows, and their positions are recorded)."""
    shape, dtype, offset = npy_header(path)
    h = hashlib.sha256()
    row_bytes = max(1, width * dtype.itemsize)
    block = max(1, (1 << 24) // row_bytes)
    with open(path, "rb") as f:
        h.update(f.read(offset))
        for start in range(0, shape[0], block):
            data = f.read(min(block, shape[0] - start) * row_bytes)
            h.update(data)
            values = np.frombuffer(data, dtype).reshape(-1, width)
            bad = np.flatnonzero(~np.isfinite(values).all(axis=1)) + start
            record += (bad if row_ids is None else row_ids[bad]).tolist()
    return h.hexdigest()


def _check_file(
    report: VerifyReport, path: Path, dtype: str, width: int, rows: int, recorded: str | None, row_ids: Any
) -> None:
    try:
        check_array(path, dtype, width, rows)
    except BergsonError as e:
        report.problems.append(str(e).split("; rebuild")[0])
        return
    bad: list[int] = []
    digest = _scan_npy(path, width, bad, row_ids)
    if recorded is not None:
        if digest != recorded:
            report.problems.append(
                f"{path}: its sha256 differs from the one recorded when it was written (the file changed since)"
            )
        else:
            report.checksums += 1
    if bad:
        what = "dataset rows" if row_ids is not None else "token rows"
        more = ", ..." if len(bad) > 10 else ""
        report.problems.append(
            f"{path}: {len(bad)} rows hold non-finite values (NaN or inf): {what} {bad[:10]}{more}"
        )
        if row_ids is not None:
            report.nonfinite_rows += bad


def _check_shard(report: VerifyReport, root: Path, shard: dict[str, Any], manifest: Any) -> None:
    name, rows = shard["file"], shard["rows"]
    sums = shard.get("sha256") or {}
    parquet = root / f"{name}.rows.parquet"
    try:
        table = read_rows_table(parquet, rows)
    except BergsonError as e:
        report.problems.append(str(e).split("; rebuild")[0])
        table = None
    if table is not None and "rows.parquet" in sums:
        if sha256_file(parquet) != sums["rows.parquet"]:
            report.problems.append(
                f"{parquet}: its sha256 differs from the one recorded when it was written (the file changed since)"
            )
        else:
            report.checksums += 1
    row_ids = table["row_id"].to_numpy() if table is not None else np.arange(rows)
    width = manifest.total_dim
    _check_file(report, root / f"{name}.npy", manifest.dtype, width, rows, sums.get("npy"), row_ids)
    if manifest.per_token and table is not None:
        count = int(table["num_tokens"].to_numpy().sum())
        _check_file(
            report, root / f"{name}{TOKENS}", manifest.dtype, width, count, sums.get("tokens.npy"), None
        )


def _records(report: VerifyReport, manifest: Any) -> None:
    nonfinite = manifest.nonfinite
    if nonfinite is None:
        report.notes.append("written before non-finite rows were recorded (format 1): no record to show")
    elif nonfinite.get("count"):
        report.notes.append(
            f"{nonfinite['count']} rows had non-finite values when written and are stored as zeros "
            f"(dataset rows {nonfinite['row_ids'][:10]}{', ...' if nonfinite['count'] > 10 else ''})"
        )
    outliers = (manifest.norms or {}).get("outliers") or {}
    if outliers.get("count"):
        report.notes.append(
            f"{outliers['count']} rows have a norm above {manifest.norms['outlier_factor']:g}x the median "
            f"({manifest.norms['median']:.4g}): dataset rows {outliers['row_ids'][:10]}"
            f"{', ...' if outliers['count'] > 10 else ''}"
        )


def verify_store(path: str | Path) -> VerifyReport:
    """Check every file of a store (shapes, dtypes, row counts, checksums recorded at write time,
    finite values), reading each once; a damaged file is a line of ``report.problems`` naming it,
    never an exception. Raises BergsonError only when ``path`` is no store at all."""
    root = Path(path)
    report = VerifyReport(str(root))
    if not (root / MANIFEST).is_file():
        if is_legacy_store(root):
            return _verify_legacy(report, root)
        raise BergsonError(f"{root}: not a bergson store (no {MANIFEST}); pass the directory a build wrote")
    try:
        manifest = read_manifest(root)
    except BergsonError as e:
        report.problems.append(str(e))
        return report
    if manifest.status != "complete":
        report.problems.append(
            f"{root / MANIFEST}: the store is {manifest.status}; rerun the build to complete it"
        )
        return report
    report.shards = len(manifest.shards)
    report.rows = sum(s["rows"] for s in manifest.shards)
    for shard in manifest.shards:
        _check_shard(report, root, shard, manifest)
    if manifest.shards and not any(s.get("sha256") for s in manifest.shards):
        report.notes.append("no checksums were recorded (written by an older bergson): not compared")
    _records(report, manifest)
    return report


def _verify_legacy(report: VerifyReport, root: Path) -> VerifyReport:
    """A store of the original package: its sizes (checked on open) and finite values; it
    recorded no checksums."""
    from .reader import GradientStore

    try:
        store = GradientStore(root)
    except BergsonError as e:
        report.problems.append(str(e))
        return report
    report.shards, report.rows = len(store.manifest.shards), len(store)
    bad: list[int] = []
    for start, block in store.blocks(4096):
        bad += (np.flatnonzero(~np.isfinite(block).all(axis=1)) + start).tolist()
    if bad:
        report.problems.append(
            f"{root}: {len(bad)} rows hold non-finite values (NaN or inf): rows {bad[:10]}"
        )
        report.nonfinite_rows = bad
    report.notes.append("a store of the original package: it recorded no checksums")
    return report
