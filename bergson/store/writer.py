"""Writing a store: one completed shard file per range of rows, resumable.

Each shard's row metadata (parquet) is written first and its vectors (``.npy``) last,
both through a temporary name, fsync and rename; a shard is complete exactly when its
``.npy`` file exists. A rerun of the same build skips complete shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..core.files import atomic_write_bytes, describe_difference
from ..core.sinks import Sink
from ..errors import BergsonError
from .health import health_records, log_health
from .integrity import SHARD_META, npy_header, read_rows_table, sha256_file, shard_record
from .manifest import (
    MANIFEST,
    Manifest,
    read_manifest,
    write_manifest,
)

logger = logging.getLogger(__name__)

SHARDS = "shards"
AGGREGATE = "aggregate.npy"
_OWN_FILES = (
    MANIFEST,
    "config.yaml",
    SHARDS,
    AGGREGATE,
    "aggregate.rows.parquet",
    "normalizers.safetensors",
    "faiss",
    "int8",
)


TOKENS = ".tokens.npy"


def shard_name(index: int) -> str:
    return f"{SHARDS}/{index:05d}"


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _parquet_bytes(
    row_id: np.ndarray,
    num_tokens: np.ndarray,
    loss: np.ndarray,
    norm: np.ndarray,
    record: dict[str, Any],
) -> bytes:
    """The rows' metadata, with the shard's record (checksums, non-finite rows) in the schema."""
    table = pa.table(
        {
            "row_id": pa.array(row_id, pa.int64()),
            "num_tokens": pa.array(num_tokens, pa.int64()),
            "loss": pa.array(loss, pa.float32()),
            "norm": pa.array(norm, pa.float32()),
        }
    ).replace_schema_metadata({SHARD_META: json.dumps(record).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


class StoreWriter(Sink):
    """A sink that writes per-row vectors (or their aggregate) into a store directory.

    With ``create=False`` it opens a store that another process (rank 0 of several workers)
    has just created or validated, and writes nothing but its own shards: the manifest must be
    there and agree with ``manifest``.

    With ``node_local=True`` it is a worker's copy of such a store on a machine that does not
    see rank 0's directory: created (or resumed) from the same manifest like rank 0's, under a
    lock, so that several workers of one machine may share it; it only collects shards, which
    are sent to rank 0 at the end, and is never finalized.
    """

    def __init__(
        self,
        root: str | Path,
        manifest: Manifest,
        *,
        overwrite: bool = False,
        create: bool = True,
        node_local: bool = False,
        foreign_files: Collection[str] = (),
    ):
        self.foreign_files = frozenset(foreign_files)
        """Names a new store's directory may already hold without being someone else's (the
        marker a distributed launch leaves in ``run_path``)."""
        self._init(root, manifest, node_local)
        if node_local:
            self._prepare_local(overwrite)
        elif create:
            self._prepare(overwrite)
        else:
            self._attach()

    def _init(self, root: str | Path, manifest: Manifest, node_local: bool) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.complete = False
        self.node_local = node_local
        """Whether this process writes a copy of its own (it does not see rank 0's store)."""
        self.local_ranks: list[int] = []
        """The ranks that write copies of their own (set by the launch; the same on every rank)."""
        self._rows: range | None = None
        self._buf: np.ndarray | None = None
        self._tokens: np.ndarray | None = None
        self._loss: np.ndarray | None = None
        self._filled: np.ndarray | None = None
        self._norm: np.ndarray | None = None
        self._nonfinite: list[int] = []
        self._token_rows: dict[int, np.ndarray] = {}

    @classmethod
    def complete_elsewhere(cls, root: str | Path, manifest: Manifest) -> StoreWriter:
        """A node-local worker's writer when rank 0's store (on another machine) is already
        complete: nothing to write, and nothing is created here."""
        writer = cls.__new__(cls)
        writer.foreign_files = frozenset()
        writer._init(root, manifest, node_local=True)
        writer.complete = True
        return writer

    # ---------------------------------------------------------------- set-up
    def _prepare(self, overwrite: bool) -> None:
        root = self.root
        if root.exists() and not root.is_dir():
            raise BergsonError(f"run_path {root} is a file; choose a directory")
        if (root / MANIFEST).is_file():
            old = read_manifest(root)
            diffs = describe_difference(old.identity(), self.manifest.identity())
            if not diffs and not overwrite:
                if old.status == "complete":
                    self.complete = True
                    self.manifest = old
                    return
                logger.info("resuming the build in %s", root)
                return
            if diffs and not overwrite:
                shown = "; ".join(diffs[:6]) + ("; ..." if len(diffs) > 6 else "")
                raise BergsonError(
                    f"{root} already holds a store built with other options ({shown}); "
                    "pass --overwrite to replace it, or choose another run_path"
                )
            remove_outputs(root, _OWN_FILES)
        elif root.is_dir() and any(p.name not in self.foreign_files for p in root.iterdir()):
            raise BergsonError(
                f"run_path {root} exists and is not a bergson store; choose a new or empty directory"
            )
        (root / SHARDS).mkdir(parents=True, exist_ok=True)
        write_manifest(root, self.manifest)

    def _prepare_local(self, overwrite: bool) -> None:
        root = self.root
        if root.exists() and not root.is_dir():
            raise BergsonError(f"run_path {root} is a file; choose a directory")
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root):  # the other workers of this machine prepare the same directory
            # an unfinished copy of this very store is resumed even with --overwrite: it may be rank
            # 0's own directory seen through a stale network-filesystem cache, and its config and
            # side files must not be removed
            resume = (root / MANIFEST).is_file()
            if resume:
                old = read_manifest(root)
                resume = old.status != "complete" and not describe_difference(
                    old.identity(), self.manifest.identity()
                )
            self._prepare(overwrite and not resume)
        self.complete = False  # a copy collects shards; only rank 0's store is finalized

    def _attach(self) -> None:
        if not (self.root / MANIFEST).is_file():
            raise BergsonError(
                f"{self.root}: this worker sees rank 0's directory but not the manifest rank 0 wrote "
                "there; check that the directory is not being replaced or cleaned by something else"
            )
        old = read_manifest(self.root)
        diffs = describe_difference(old.identity(), self.manifest.identity())
        if diffs:
            shown = "; ".join(diffs[:6]) + ("; ..." if len(diffs) > 6 else "")
            raise BergsonError(
                f"{self.root}: the store rank 0 prepared does not match this worker's ({shown}); "
                "every worker must see the same model, data and options"
            )
        if old.status == "complete":
            self.complete = True
            self.manifest = old

    # ---------------------------------------------------------------- shards
    def done(self, index: int) -> bool:
        return self.complete or (self.root / f"{shard_name(index)}.npy").is_file()

    @property
    def aggregate(self) -> bool:
        return self.manifest.aggregation != "none"

    def begin_shard(self, index: int, rows: range) -> None:
        n = len(rows)
        dim = self.manifest.total_dim
        self._rows = rows
        self._buf = np.zeros(
            (1 if self.aggregate else n, dim), np.float64 if self.aggregate else self.manifest.dtype
        )
        self._tokens = np.zeros(n, np.int64)
        self._loss = np.zeros(n, np.float32)
        self._filled = np.zeros(n, bool)
        self._norm = np.zeros(n, np.float32)
        self._nonfinite = []
        self._token_rows = {}

    def write(self, row_ids, vectors, num_tokens, losses, tokens=None) -> None:  # types: Sink.write
        """Store float32/float64 ``vectors`` [B, D] for dataset rows ``row_ids`` of the current shard
        (and, in a per-token store, ``tokens`` [B, S, D]: row b's first ``num_tokens[b]`` positions;
        None means zeros)."""
        assert self._rows is not None and self._buf is not None
        assert self._tokens is not None and self._loss is not None and self._filled is not None
        assert self._norm is not None
        local = np.asarray(row_ids) - self._rows.start
        vectors = np.asarray(vectors)
        bad: np.ndarray = np.asarray(~np.isfinite(vectors).all(axis=1), bool)
        if self.manifest.per_token and tokens is not None:
            bad |= np.array(
                [not np.isfinite(tokens[b, : int(num_tokens[b])]).all() for b in range(len(local))], bool
            )
        if bad.any():
            # never a NaN in the store: the row is stored as zeros and listed (finalize warns)
            self._nonfinite += np.asarray(row_ids)[bad].tolist()
            vectors = np.where(bad[:, None], 0.0, vectors)
        if self.aggregate:
            self._buf[0] += vectors.astype(np.float64).sum(axis=0)
            self._norm[local] = np.linalg.norm(vectors.astype(np.float64), axis=1)
        else:
            cast = vectors.astype(self._buf.dtype)
            if not np.isfinite(cast).all():
                raise BergsonError(
                    f"gradient values exceed the {self._buf.dtype} range; pass --save_dtype float32"
                )
            self._buf[local] = cast
            self._norm[local] = np.linalg.norm(cast.astype(np.float64), axis=1)
        if self.manifest.per_token and not self.aggregate:
            for b, i in enumerate(local):
                n = int(num_tokens[b])
                if tokens is not None and not bad[b]:
                    rows = tokens[b, :n]
                else:  # no token rows given, or a non-finite row: zeros
                    rows = np.zeros((n, self._buf.shape[1]))
                cast = rows.astype(self._buf.dtype)
                if not np.isfinite(cast).all():
                    raise BergsonError(
                        f"token values of dataset row {int(row_ids[b])} are not finite in {self._buf.dtype}; "
                        "pass --save_dtype float32"
                    )
                self._token_rows[int(i)] = cast
        self._tokens[local] = num_tokens
        self._loss[local] = losses
        self._filled[local] = True

    def end_shard(self, index: int) -> None:
        assert self._rows is not None and self._buf is not None and self._filled is not None
        assert self._tokens is not None and self._loss is not None
        if not self._filled.all():
            missing = np.flatnonzero(~self._filled)[:5] + self._rows.start
            raise RuntimeError(f"shard {index} is missing rows {missing.tolist()}")
        assert self._norm is not None
        base = self.root / shard_name(index)
        row_ids = np.arange(self._rows.start, self._rows.stop)
        vectors = _npy_bytes(self._buf)
        record: dict[str, Any] = {
            "sha256": {"npy": hashlib.sha256(vectors).hexdigest()},
            "nonfinite_rows": sorted(self._nonfinite),
        }
        if self.manifest.per_token and not self.aggregate:
            parts = [self._token_rows[i] for i in range(len(row_ids))]
            empty = np.zeros((0, self._buf.shape[1]), self._buf.dtype)
            token_bytes = _npy_bytes(np.concatenate([empty, *parts]))
            record["sha256"]["tokens.npy"] = hashlib.sha256(token_bytes).hexdigest()
            atomic_write_bytes(base.with_suffix(TOKENS), token_bytes)
            self._token_rows = {}
        if self._nonfinite:
            logger.warning(
                "shard %d: %d rows had non-finite values (NaN or inf) and are stored as zeros: dataset rows %s",
                index,
                len(self._nonfinite),
                self._nonfinite[:10],
            )
        atomic_write_bytes(
            base.with_suffix(".rows.parquet"),
            _parquet_bytes(row_ids, self._tokens, self._loss, self._norm, record),
        )
        atomic_write_bytes(base.with_suffix(".npy"), vectors)
        self._rows = self._buf = None

    # ---------------------------------------------------------------- finish
    def finalize(self, num_shards: int) -> Manifest:
        """Mark the store complete (combining per-shard sums for aggregated stores)."""
        if self.complete:
            return self.manifest
        shards = [shard_name(i) for i in range(num_shards)]
        missing = [s for s in shards if not (self.root / f"{s}.npy").is_file()]
        if missing:
            shown = ", ".join(missing[:8]) + (", ..." if len(missing) > 8 else "")
            raise BergsonError(
                f"{self.root}: {len(missing)} of {num_shards} shards are missing ({shown}); "
                "rerunning the same command resumes: it computes only the missing shards"
            )
        tables = [read_rows_table(self.root / f"{s}.rows.parquet") for s in shards]
        self.manifest.nonfinite, self.manifest.norms = health_records(
            self.root, shards, tables, self.manifest.kind
        )
        if self.aggregate:
            self._write_aggregate(shards, tables)
        else:
            self.manifest.shards = [self._shard_entry(s, t) for s, t in zip(shards, tables)]
        log_health(self.root, self.manifest)
        self.manifest.status = "complete"
        write_manifest(self.root, self.manifest)
        self.complete = True
        return self.manifest

    def _shard_entry(self, name: str, table: Any) -> dict[str, Any]:
        """A completed shard's manifest entry: its rows and the checksums of its files (none for a
        shard written before checksums were recorded)."""
        shape, _, _ = npy_header(self.root / f"{name}.npy")
        entry: dict[str, Any] = {"file": name, "rows": int(shape[0])}
        sums = shard_record(table).get("sha256")
        if sums:
            entry["sha256"] = {**sums, "rows.parquet": sha256_file(self.root / f"{name}.rows.parquet")}
        return entry

    def _write_aggregate(self, shards: list[str], tables: list[Any]) -> None:
        """Combine the shards' sums into ``aggregate.npy`` (a mean over the rows for ``mean``)."""
        total = np.zeros(self.manifest.total_dim, np.float64)
        tokens, losses, count = 0, [], 0
        for s, meta in zip(shards, tables):
            total += np.load(self.root / f"{s}.npy", allow_pickle=False)[0]
            tokens += int(meta["num_tokens"].to_numpy().sum())
            losses.append(meta["loss"].to_numpy())
            count += meta.num_rows
        if self.manifest.aggregation == "mean" and count:
            total /= count
        vec = total.astype(self.manifest.dtype)[None]
        loss = float(np.concatenate(losses).mean()) if count else 0.0
        vec_bytes = _npy_bytes(vec)
        norm = np.linalg.norm(vec.astype(np.float64), axis=1)
        record = {"sha256": {"npy": hashlib.sha256(vec_bytes).hexdigest()}, "nonfinite_rows": []}
        rows_bytes = _parquet_bytes(
            np.array([-1]), np.array([tokens]), np.array([loss], np.float32), norm, record
        )
        atomic_write_bytes(self.root / "aggregate.rows.parquet", rows_bytes)
        atomic_write_bytes(self.root / AGGREGATE, vec_bytes)
        sums = {**record["sha256"], "rows.parquet": hashlib.sha256(rows_bytes).hexdigest()}
        self.manifest.shards = [{"file": "aggregate", "rows": 1, "source_rows": count, "sha256": sums}]
        self.manifest.num_rows = 1


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on the directory ``root`` (for processes of one machine)."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform: workers of one machine race as before
        yield
        return
    fd = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def remove_outputs(root: Path, names: Iterable[str]) -> None:
    """Delete the named files and directories under ``root`` (what ``--overwrite`` replaces)."""
    for name in names:
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
