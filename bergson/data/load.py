"""Open a dataset from a hub id, a local file or a ``save_to_disk`` directory.

A local path never reaches out to the hub. :func:`load_rows` reads a small local JSON-lines or
Parquet file of plain columns with pyarrow alone (``datasets``, and the pandas it imports, are
not imported: 0.7 CPU-seconds of start-up on a small run), giving the same rows, in the same
order, with the same values as :func:`load_data`; everything else goes through ``datasets``.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DataConfig
from ..config.data import parse_kwargs
from ..errors import BergsonError

logger = logging.getLogger(__name__)

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_COMPRESSION = {".gz", ".bz2", ".xz", ".zst", ".zstd"}


def _builder_for(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION:
        suffixes = suffixes[:-1]
    return _BUILDERS.get(suffixes[-1]) if suffixes else None


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or _builder_for(Path(name)) is not None


def _slice_split(ds: Any, split: str, option: str) -> Any:
    """Apply 'name[a:b]' slice syntax to an in-memory Dataset or DatasetDict."""
    from datasets import DatasetDict, ReadInstruction

    name = split.split("[", 1)[0]
    if isinstance(ds, DatasetDict):
        if name not in ds:
            raise BergsonError(
                f"{option} {split}: no split {name!r}; available: {', '.join(str(k) for k in ds)}"
            )
        ds = ds[name]
        lengths = {name: len(ds)}
    else:
        lengths = {name: len(ds)}
    if "[" not in split:
        return ds
    try:
        (instr,) = ReadInstruction.from_spec(split).to_absolute(lengths)
    except (ValueError, AssertionError) as e:
        raise BergsonError(f"{option} {split}: cannot parse the slice ({e})") from e
    return ds.select(range(instr.from_, instr.to))


def load_data(cfg: DataConfig, option: str = "--dataset", report: dict[str, Any] | None = None) -> Any:
    """Load ``cfg.dataset`` (one split, sliced) as a ``datasets.Dataset``; with
    ``cfg.skip_nan_rewards`` the rows without a reward are left out (announced, and counted in
    ``report``), so that every reader of the same options sees the same rows."""
    return _nonempty_with_rewards(_load(cfg, option), cfg, option, report)


def _nonempty_with_rewards(rows: Any, cfg: DataConfig, option: str, report: dict[str, Any] | None) -> Any:
    """Refuse no rows; leave out the rows without a reward under ``--skip_nan_rewards`` (counted
    in ``report``)."""
    if len(rows) == 0:
        raise _no_rows(cfg, option)
    rows, left_out = drop_missing_rewards(rows, cfg)
    if report is not None and cfg.skip_nan_rewards:
        report["rows_without_reward_left_out"] = left_out
    return rows


FAST_PATH_MAX_BYTES = 10 << 20
"""The largest local file :func:`load_rows` reads with pyarrow: ``datasets`` reads JSON lines in
chunks of this size and casts every later chunk to the first chunk's types, so up to it, one
pyarrow read gives its types exactly."""
_SPLIT = re.compile(r"train(?:\[(\d*):(\d*)\])?")


class LocalRows:
    """The rows of a local file read with pyarrow: the part of ``datasets.Dataset`` that
    tokenizing reads (``column_names``, ``len``, ``rows[column]`` as a Python list, ``select``)."""

    def __init__(self, table: Any, source: str) -> None:
        self.table = table
        self.source = source

    @property
    def column_names(self) -> list[str]:
        return list(self.table.column_names)

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, column: str) -> list[Any]:
        if not isinstance(column, str):
            raise TypeError("LocalRows is indexed by column name; use to_dataset() for rows")
        return self.table.column(column).to_pylist()

    def select(self, indices: Any) -> LocalRows:
        import pyarrow as pa

        idx = np.ascontiguousarray(np.fromiter((int(i) for i in indices), np.int64))
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        # from the buffer: pa.array() would import pandas to check for a Series
        taken = pa.Array.from_buffers(pa.int64(), len(idx), [None, pa.py_buffer(idx)])
        return LocalRows(self.table.take(taken), self.source)

    def to_dataset(self) -> Any:
        """The same rows as a ``datasets.Dataset``."""
        from datasets import Dataset

        return Dataset(self.table)

    def __repr__(self) -> str:
        return f"LocalRows({self.source!r}, rows={len(self)}, columns={self.column_names})"


def load_rows(cfg: DataConfig, option: str = "--dataset", report: dict[str, Any] | None = None) -> Any:
    """:func:`load_data` for a reader that needs only columns of rows (tokenizing): a local
    ``.jsonl``/``.json`` (JSON lines) or ``.parquet`` file of at most :data:`FAST_PATH_MAX_BYTES`
    whose columns are all plain (text, numbers, booleans), with split ``train`` or
    ``train[a:b]`` and no ``--data_args``, comes back as :class:`LocalRows` read by pyarrow, with
    the rows and values ``datasets`` would give; anything else as :func:`load_data` gives it."""
    rows = _read_plain_file(cfg)
    if rows is None:
        return load_data(cfg, option, report)
    return _nonempty_with_rewards(rows, cfg, option, report)


def _read_plain_file(cfg: DataConfig) -> LocalRows | None:
    """The file's rows, or None when it is not a file :func:`load_rows` reads itself (then
    ``datasets`` reads it, and reports what is wrong with it)."""
    split = _SPLIT.fullmatch(cfg.split)
    if not cfg.dataset or cfg.data_args or cfg.subset is not None or split is None:
        return None
    path = Path(os.path.expanduser(cfg.dataset))
    builder = _builder_for(path)
    if builder not in ("json", "parquet") or not path.is_file():
        return None
    suffix = path.suffix.lower()
    if suffix in _COMPRESSION and (builder == "parquet" or suffix != ".gz"):
        return None
    try:
        table = _read_json_lines(path) if builder == "json" else _read_parquet(path)
    except Exception:  # datasets reads it again, and says what is wrong
        return None
    if table is None or not all(_plain(field.type) for field in table.schema):
        return None
    start, stop = split.group(1), split.group(2)
    n = table.num_rows
    a = min(int(start), n) if start else 0
    b = min(int(stop), n) if stop else n
    if a > b:
        return None
    return LocalRows(table.slice(a, b - a) if (a, b) != (0, n) else table, str(path))


def _plain(t: Any) -> bool:
    import pyarrow as pa

    return (
        pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
        or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_null(t)
    )  # fmt: skip


def _read_json_lines(path: Path) -> Any:
    """JSON lines read as ``datasets``' json builder reads one chunk: the same bytes (a leading
    byte-order mark dropped), the same pyarrow reader and block size, the same retries."""
    import codecs
    import gzip
    import io

    import pyarrow as pa
    from pyarrow import json as paj

    if path.stat().st_size > FAST_PATH_MAX_BYTES:
        return None
    with gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb") as f:
        data = f.read(FAST_PATH_MAX_BYTES + 1)
    if len(data) > FAST_PATH_MAX_BYTES or not data.strip():
        return None
    data = data.removeprefix(codecs.BOM_UTF8)
    if data.lstrip().startswith(b"["):
        return None  # one JSON list: datasets converts it (and its strings) itself
    block = max(FAST_PATH_MAX_BYTES // 32, 16 << 10)
    block = len(data) if len(data) // 8 > block else block
    while True:
        try:
            table = paj.read_json(io.BytesIO(data), read_options=paj.ReadOptions(block_size=block))
            table.validate()
            return table
        except pa.ArrowInvalid as e:
            if ("straddling" in str(e) or "JSON conversion to" in str(e)) and block < len(data):
                block *= 2
                continue
            return None


def _read_parquet(path: Path) -> Any:
    import pyarrow.parquet as pq

    if path.stat().st_size > FAST_PATH_MAX_BYTES:
        return None
    f = pq.ParquetFile(path)
    if b"huggingface" in (f.schema_arrow.metadata or {}):
        return None  # datasets' own features (images, class labels, ...) decode values
    return f.read()


def missing_rewards(ds: Any, column: str) -> np.ndarray:
    """Which rows of ``ds`` have no reward in ``column`` (None or NaN)."""
    if column not in ds.column_names:
        raise BergsonError(
            f"--reward_column {column!r}: no such column in the dataset; columns are {', '.join(ds.column_names)}"
        )
    return np.array([v is None or (isinstance(v, float) and math.isnan(v)) for v in ds[column]], dtype=bool)


def drop_missing_rewards(ds: Any, cfg: DataConfig) -> tuple[Any, int]:
    """With ``cfg.skip_nan_rewards``: ``ds`` without its rows that have no reward, and how many
    were left out (announced)."""
    if not (cfg.skip_nan_rewards and cfg.reward_column):
        return ds, 0
    missing = missing_rewards(ds, cfg.reward_column)
    if not missing.any():
        return ds, 0
    logger.warning(
        "--skip_nan_rewards: leaving out %d of %d rows without a reward in --reward_column %r "
        "(the rows that remain are numbered 0..%d)",
        int(missing.sum()), len(missing), cfg.reward_column, int((~missing).sum()) - 1,
    )  # fmt: skip
    return ds.select([int(i) for i in np.flatnonzero(~missing)]), int(missing.sum())


def _load(cfg: DataConfig, option: str) -> Any:
    import datasets

    name = cfg.dataset
    args_option = option.replace("dataset", "data_args")
    kwargs = parse_kwargs(cfg.data_args, args_option)
    if not name:
        raise BergsonError(f"{option} is required: a hub id, a local file or a save_to_disk directory")
    path = Path(os.path.expanduser(name))
    saved = path.is_dir() and any(
        (path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json")
    )
    if cfg.subset is not None and (saved or path.is_file()):
        raise BergsonError(
            f"{option.replace('dataset', 'subset')} {cfg.subset}: it names a configuration of a hub dataset "
            f"that has several, and {name} is a single {'saved dataset' if saved else 'file'}; drop the option"
        )
    try:
        if path.is_dir():
            if saved:
                if kwargs:
                    raise BergsonError(
                        f"{args_option} {cfg.data_args!r}: {name} is a save_to_disk directory, read as it "
                        "is saved (load_dataset's arguments do not apply); drop the option"
                    )
                return _slice_split(datasets.load_from_disk(str(path)), cfg.split, "--split")
            return datasets.load_dataset(str(path), cfg.subset, split=cfg.split, **kwargs)
        if path.is_file():
            builder = _builder_for(path)
            if builder is None:
                raise BergsonError(
                    f"{option} {name}: unknown file type; use .json, .jsonl, .csv or .parquet (optionally .gz)"
                )
            if cfg.split.split("[", 1)[0] != "train":
                raise BergsonError(
                    f"--split {cfg.split}: a single local file has only the 'train' split (e.g. 'train[:100]')"
                )
            if path.stat().st_size == 0:
                raise _unreadable(path, option, "it is empty (no rows)")
            return datasets.load_dataset(builder, data_files=str(path), split=cfg.split, **kwargs)
        if _looks_like_path(name):
            raise BergsonError(f"{option} {name}: no such file or directory")
        return datasets.load_dataset(name, cfg.subset, split=cfg.split, **kwargs)
    except BergsonError:
        raise
    except StopIteration as e:  # the json builder reads the first rows to infer the columns
        raise _unreadable(path, option, "no rows could be read from it (is it empty?)") from e
    except TypeError as e:
        if not kwargs:
            raise
        raise BergsonError(f"{args_option} {cfg.data_args!r}: datasets.load_dataset refused it ({e})") from e
    except (OSError, ValueError) as e:  # OSError: missing files, and the hub out of reach (ConnectionError)
        if "corresponds to no data" in str(e):
            raise _no_rows(cfg, option) from e
        raise BergsonError(f"{option} {name} (split {cfg.split!r}): {e}") from e
    except Exception as e:
        from datasets.exceptions import DatasetGenerationError

        if not isinstance(e, DatasetGenerationError):
            raise
        cause = e.__cause__ or e.__context__ or e
        raise _unreadable(path, option, f"{type(cause).__name__}: {cause}") from e


def _no_rows(cfg: DataConfig, option: str) -> BergsonError:
    return BergsonError(
        f"{option} {cfg.dataset} (split {cfg.split!r}) holds no rows; give a dataset "
        "(or a --split slice) with at least one row"
    )


def _unreadable(path: Path, option: str, why: str) -> BergsonError:
    """The error for a local file (or directory) that ``datasets`` could not read: the first
    malformed line of a JSON-lines file, or ``why``."""
    where = _first_bad_json_line(path) if path.is_file() and _builder_for(path) == "json" else None
    if where is not None:
        why = where
    return BergsonError(
        f"{option} {path}: cannot read it as a dataset: {why}; fix or replace the file{_FORMAT.get(_builder_for(path) or '', '')}"
    )


_FORMAT = {
    "json": " (a .jsonl file holds one JSON object per line; a .json file a JSON list of objects, or JSON lines)",
    "csv": " (a .csv file holds a header line of column names, then one row per line)",
    "parquet": " (write it again with pyarrow or pandas' to_parquet)",
}


def _open_text(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix == ".gz":
        import gzip

        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    if suffix == ".bz2":
        import bz2

        return bz2.open(path, "rt", encoding="utf-8", errors="replace")
    if suffix == ".xz":
        import lzma

        return lzma.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _first_bad_json_line(path: Path) -> str | None:
    """Where a JSON-lines file goes wrong: 'line N: <the parser's message>', 'it is empty', or
    None when every line parses (or the file is one JSON document, or cannot be opened)."""
    import json

    try:
        with _open_text(path) as f:
            head = f.read(1)
            if not head:
                return "it is empty (no rows)"
            f.seek(0)
            count = 0
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                count += 1
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    if n == 1 and line.lstrip().startswith("["):
                        return None  # one JSON list over several lines
                    return f"line {n} is not valid JSON ({e.msg}, column {e.colno})"
                if not isinstance(row, dict):
                    return f"line {n} holds a JSON {type(row).__name__}, not an object of columns"
            return None if count else "it holds only blank lines (no rows)"
    except (OSError, EOFError, ValueError):
        return None
