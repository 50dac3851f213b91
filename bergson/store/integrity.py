"""The checks that a store's files are what its manifest says, before anything reads them.

A shard's ``.npy`` header is read by hand (never numpy's loader on a file it may choke on) and
checked against the manifest: two dimensions, the store's dtype and width, the manifest's row
count, and a file size that holds exactly those rows. Its ``.rows.parquet`` must open and hold as
many rows. These are the cheap checks every reader runs on open; :mod:`bergson.store.verify` adds
the expensive ones (checksums, finite values).

The writer keeps, in each shard's ``.rows.parquet`` schema metadata (:data:`SHARD_META`), the
sha256 of the shard's ``.npy`` (and ``.tokens.npy``) and the rows it stored as zeros because
their vectors were not finite; :meth:`StoreWriter.finalize` copies them into the manifest.
"""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import BergsonError

SHARD_META = b"bergson.shard"
"""The key of a shard's record (JSON) in its ``.rows.parquet`` schema metadata."""
ROW_COLUMNS = ("row_id", "num_tokens", "loss")
REBUILD = (
    "rebuild the store (rerun the command that wrote it with --overwrite), or restore the file "
    "from a copy; `bergson verify STORE` lists every damaged file"
)


def damaged(path: Path, what: str) -> BergsonError:
    return BergsonError(f"{path} is damaged: {what}; {REBUILD}")


def npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, offset of the data) of a C-order ``.npy`` file, read without numpy's loader
    (which can be made to unpickle, or to fail with a traceback, by a damaged header)."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 10 or head[:6] != b"\x93NUMPY":
                raise damaged(path, "not a .npy file (no NUMPY magic)")
            major = head[6]
            if major == 1:
                length, start = int.from_bytes(head[8:10], "little"), 10
            elif major in (2, 3):
                length, start = int.from_bytes(head[8:12], "little"), 12
            else:
                raise damaged(path, f"unknown .npy format version {major}")
            f.seek(start)
            text = f.read(length)
    except OSError as e:
        raise BergsonError(f"{path}: cannot be read ({e})") from e
    if len(text) != length:
        raise damaged(path, "its header is cut short")
    try:
        header = ast.literal_eval(text.decode("latin1"))
        descr, fortran, shape = header["descr"], header["fortran_order"], tuple(header["shape"])
        dtype = np.dtype(descr)
    except (ValueError, SyntaxError, KeyError, TypeError, MemoryError, RecursionError) as e:
        raise damaged(path, f"its header cannot be read ({type(e).__name__})") from e
    if dtype.hasobject:
        raise damaged(path, "its header says it holds Python objects (bergson never writes those)")
    if fortran or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise damaged(path, f"its header describes an array bergson never writes ({header})")
    return shape, dtype, start + length


def check_array(path: Path, dtype: str | np.dtype, width: int, rows: int | None) -> tuple[int, ...]:
    """The shape of the shard ``path`` after checking it holds [rows, width] values of ``dtype``
    (any number of rows when ``rows`` is None) and that the file is exactly that long."""
    if not path.is_file():
        raise BergsonError(f"{path} is missing; {REBUILD}")
    shape, found, offset = npy_header(path)
    if len(shape) != 2 or shape[1] != width:
        raise damaged(
            path, f"it holds an array of shape {shape}, not rows of width {width} as the manifest says"
        )
    if found != np.dtype(dtype):
        raise damaged(path, f"it holds {found} values, not {np.dtype(dtype)} as the manifest says")
    if rows is not None and shape[0] != rows:
        raise damaged(path, f"it holds {shape[0]} rows, but the store's records say {rows}")
    expected = offset + shape[0] * shape[1] * found.itemsize
    size = path.stat().st_size
    if size != expected:
        cut = "truncated" if size < expected else "longer than its header says"
        raise damaged(path, f"{size} bytes where its header describes {expected} ({cut})")
    return shape


def read_rows_table(path: Path, rows: int | None = None) -> pa.Table:
    """A shard's ``.rows.parquet``: readable, with ``row_id``, ``num_tokens`` and ``loss`` (and
    ``rows`` rows, when given)."""
    if not path.is_file():
        raise BergsonError(f"{path} is missing; {REBUILD}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise damaged(path, f"not a readable parquet file ({str(e).splitlines()[0][:160]})") from e
    missing = [c for c in ROW_COLUMNS if c not in table.column_names]
    if missing:
        raise damaged(path, f"no {', '.join(missing)} column")
    if rows is not None and table.num_rows != rows:
        raise damaged(path, f"it holds {table.num_rows} rows, but the store's records say {rows}")
    return table


def shard_record(table: pa.Table) -> dict[str, Any]:
    """What the writer recorded about a shard in its ``.rows.parquet`` ({} for shards written
    before the record: no checksums, no list of non-finite rows)."""
    meta = table.schema.metadata or {}
    try:
        return json.loads(meta[SHARD_META]) if SHARD_META in meta else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def open_shard(root: Path, file: str, rows: int, dtype: str, width: int) -> tuple[np.ndarray, pa.Table]:
    """One shard of a store, checked (sizes and counts) and memory-mapped, with its rows' table."""
    table = read_rows_table(root / f"{file}.rows.parquet")
    npy = root / f"{file}.npy"
    check_array(npy, dtype, width, rows)
    if table.num_rows != rows:
        raise damaged(
            root / f"{file}.rows.parquet",
            f"it holds {table.num_rows} rows, but {npy.name} and the manifest hold {rows}",
        )
    try:
        array = np.load(npy, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise damaged(npy, f"numpy cannot map it ({e})") from e
    return array, table
