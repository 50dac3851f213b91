"""Reading a store without loading it into memory (ours, or one of the original package)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BergsonError
from .integrity import check_array, open_shard
from .legacy import is_legacy_store, open_legacy
from .manifest import MANIFEST, Manifest, read_manifest
from .writer import TOKENS

logger = logging.getLogger(__name__)

ROW_DTYPE = np.dtype([("row_id", np.int64), ("num_tokens", np.int64), ("loss", np.float32)])


class RowConcat:
    """Read-only rows of several memory-mapped arrays, seen as one [rows, dim] array."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.offsets = np.cumsum([0] + [p.shape[0] for p in parts])
        self.shape = (int(self.offsets[-1]), parts[0].shape[1] if parts else 0)
        self.dtype = parts[0].dtype if parts else np.dtype(np.float16)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.concatenate([np.asarray(p) for p in self.parts]) if self.parts else np.zeros(self.shape)
        return out.astype(dtype) if dtype is not None else out

    def __getitem__(self, key: Any) -> np.ndarray:
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        if isinstance(rows, (int, np.integer)):
            i = int(rows) + (self.shape[0] if rows < 0 else 0)
            s = int(np.searchsorted(self.offsets, i, side="right")) - 1
            return np.asarray(self.parts[s][i - self.offsets[s]])[cols]
        if isinstance(rows, slice):
            idx = np.arange(*rows.indices(self.shape[0]))
        else:
            idx = np.asarray(rows)
            if idx.dtype == bool:
                idx = np.flatnonzero(idx)
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        out = np.empty((len(idx), self.shape[1]), self.dtype)
        for s in np.unique(which):
            sel = which == s
            out[sel] = self.parts[s][idx[sel] - self.offsets[s]]
        return out[:, cols]


class GradientStore:
    """A complete store opened read-only.

    ``store.modules`` lists module names; ``store[name]`` is that module's [rows, dim]
    array (memory-mapped); ``store.rows`` holds per-row metadata (``row_id``, the dataset
    row; ``num_tokens``; ``loss``); ``store.manifest`` says how the vectors were made;
    ``store.to_dataset()`` is the store as a ``datasets.Dataset`` (no copy). A store written by
    the original package (``info.json``, ``gradients.bin``) is read in place the same way
    (:mod:`bergson.store.legacy`; ``store.is_legacy``).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._token_parts: list[np.ndarray] | None = None
        self._legacy = not (self.root / MANIFEST).is_file() and is_legacy_store(self.root)
        if self._legacy:
            # a store of the original package: its gradients.bin mapped in place
            self.manifest, self._parts, self.rows = open_legacy(self.root)
            self._shard_starts = np.cumsum([0] + [p.shape[0] for p in self._parts])
            return
        self.manifest: Manifest = read_manifest(self.root)
        if self.manifest.status != "complete":
            raise BergsonError(
                f"{self.root}: the store is still being written or was interrupted; "
                "rerun the same build command to complete it"
            )
        self._parts: list[np.ndarray] = []
        metas = []
        dtype, width = self.manifest.dtype, self.manifest.total_dim
        for shard in self.manifest.shards:
            part, meta = open_shard(self.root, shard["file"], shard["rows"], dtype, width)
            self._parts.append(part)
            metas.append(meta)
        self.rows = np.zeros(sum(m.num_rows for m in metas), ROW_DTYPE)
        start = 0
        for m in metas:
            for col in ROW_DTYPE.names or ():
                self.rows[col][start : start + m.num_rows] = m[col].to_numpy()
            start += m.num_rows
        self._shard_starts = np.cumsum([0] + [p.shape[0] for p in self._parts])
        if self.manifest.per_token:
            self._check_token_files()
        warn_nonfinite(self)

    @property
    def has_tokens(self) -> bool:
        """Whether the store holds one row per token beside each row (built with --per_token)."""
        return self.manifest.per_token

    def token_rows(self, index: int) -> np.ndarray:
        """The token rows [num_tokens, total_dim] of store row ``index`` (memory-mapped); they sum
        to the row."""
        if not self.has_tokens:
            raise BergsonError(f"{self.root} has no token rows; rebuild it with --per_token")
        if self._token_parts is None:
            self._token_parts = [
                np.load(self.root / f"{shard['file']}{TOKENS}", mmap_mode="r", allow_pickle=False)
                for shard in self.manifest.shards
            ]
        index = int(index)
        s = int(np.searchsorted(self._shard_starts, index, side="right")) - 1
        first = int(self._shard_starts[s])
        counts = self.rows["num_tokens"][first : index + 1]
        stop = int(counts.sum())
        return self._token_parts[s][stop - int(counts[-1]) : stop]

    def _check_token_files(self) -> None:
        """Each shard's token rows: as many as its rows' tokens, of the store's width and dtype."""
        for shard, start, stop in zip(self.manifest.shards, self._shard_starts, self._shard_starts[1:]):
            count = int(self.rows["num_tokens"][start:stop].sum())
            path = self.root / f"{shard['file']}{TOKENS}"
            check_array(path, self.manifest.dtype, self.manifest.total_dim, count)

    @property
    def is_legacy(self) -> bool:
        """Whether this is a store of the original package, read in place (``bergson convert``
        rewrites it as one of ours)."""
        return self._legacy

    def to_dataset(self, data: Any = None) -> Any:
        """This store as a ``datasets.Dataset``: one row per store row with its ``row_id``,
        ``num_tokens`` and ``loss`` and a ``gradients`` column (every module's columns side by
        side, in the store's dtype). The gradients are the memory-mapped shard files themselves,
        not a copy (see :func:`dataset_view`).

        ``data`` (a ``datasets.Dataset`` of the documents the store was built from) adds its
        columns, row ``row_id`` of ``data`` beside each store row. Without ``data``, the rows saved
        beside the store (``data.hf``: stores of the original package, and those written by
        ``collect_gradients(data=...)``) are added when they are there."""
        from .dataset_view import dataset_view

        return dataset_view(self, data)

    @property
    def modules(self) -> list[str]:
        return [m.name for m in self.manifest.modules]

    @property
    def dims(self) -> dict[str, int]:
        return {m.name: m.dim for m in self.manifest.modules}

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return (
            f"GradientStore({str(self.root)!r}, rows={len(self)}, modules={len(self.modules)}, "
            f"dim={self.manifest.total_dim}, dtype={self.manifest.dtype})"
        )

    def _view(self, cols: slice) -> np.ndarray | RowConcat:
        parts = [p[:, cols] for p in self._parts]
        return parts[0] if len(parts) == 1 else RowConcat(parts)

    def __getitem__(self, module: str) -> np.ndarray | RowConcat:
        m = self.manifest.module(module)
        return self._view(slice(m.offset, m.offset + m.dim))

    @property
    def all(self) -> np.ndarray | RowConcat:
        """Every module's columns side by side: [rows, total_dim]."""
        return self._view(slice(None))

    def blocks(self, block_rows: int = 8192) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first row, rows [b, total_dim]) blocks, reading shard by shard."""
        start = 0
        for part in self._parts:
            for s in range(0, part.shape[0], block_rows):
                yield start + s, np.asarray(part[s : s + block_rows])
            start += part.shape[0]


_WARNED: set[tuple[str, int]] = set()


def warn_nonfinite(store: GradientStore) -> None:
    """Say (once per store and process) that a store holds rows whose vectors were not finite when
    written and are stored as zeros."""
    record = store.manifest.nonfinite
    if not record or not record.get("count"):
        return
    key = (str(store.root.resolve()), int(record["count"]))
    if key in _WARNED:
        return
    _WARNED.add(key)
    ids = record.get("row_ids", [])
    more = ", ..." if record["count"] > len(ids[:10]) else ""
    logger.warning(
        "%s: %d rows had non-finite gradients (NaN or inf) when written and are stored as zeros "
        "(dataset rows %s%s): they score 0 against every query; rebuild with --precision fp32 to "
        "recompute them, and see `bergson verify %s`",
        store.root,
        record["count"],
        ", ".join(map(str, ids[:10])),
        more,
        store.root,
    )


def load_gradients(root: str | Path) -> GradientStore:
    """Open a complete gradient store read-only (memory-mapped): one of ours, or one written by
    the original package (``info.json``, ``gradients.bin``, ``data.hf``), read in place."""
    return GradientStore(root)


def load_gradient_dataset(root: str | Path, data: Any = None) -> Any:
    """A store as a ``datasets.Dataset`` with a memory-mapped ``gradients`` column (the original
    package's name for it): ``load_gradients(root).to_dataset(data)``."""
    return GradientStore(root).to_dataset(data)
