"""A gradient store seen as a ``datasets.Dataset`` without copying its vectors.

Each shard file is memory-mapped by the store; its bytes are wrapped as an Arrow buffer (the
buffer protocol: no copy), read as the values of a fixed-size list array (one list of
``total_dim`` numbers per row), and the shards become the chunks of one ``gradients`` column.
Pages are read from disk only when rows are accessed.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import BergsonError

META_COLUMNS = ("row_id", "num_tokens", "loss")


def rows_array(part: np.ndarray) -> pa.FixedSizeListArray:
    """[rows, dim] C-contiguous array -> a fixed-size list array over the same memory."""
    if not part.flags.c_contiguous:
        raise BergsonError("a store shard is not C-contiguous; it cannot be viewed without a copy")
    n, dim = part.shape
    values = pa.Array.from_buffers(pa.from_numpy_dtype(part.dtype), n * dim, [None, pa.py_buffer(part)])
    return pa.FixedSizeListArray.from_arrays(values, dim)


def gradients_table(store: Any) -> pa.Table:
    """``row_id``, ``num_tokens``, ``loss`` and ``gradients`` of every row, one chunk per shard."""
    chunks = [rows_array(p) for p in store._parts if p.shape[0]]
    dim = store.manifest.total_dim
    if not chunks:
        chunks = [pa.FixedSizeListArray.from_arrays(pa.array([], pa.from_numpy_dtype(store.all.dtype)), dim)]
    starts = store._shard_starts
    meta = {
        name: pa.chunked_array(
            [
                pa.array(store.rows[name][starts[i] : starts[i + 1]])
                for i, p in enumerate(store._parts)
                if p.shape[0]
            ]
            or [pa.array(store.rows[name])]
        )
        for name in META_COLUMNS
    }
    return pa.table({**meta, "gradients": pa.chunked_array(chunks)})


def dataset_view(store: Any, data: Any = None) -> Any:
    """See :meth:`GradientStore.to_dataset` (``store`` is a GradientStore; the reader imports this
    module, not the other way round)."""
    from datasets import Dataset, concatenate_datasets
    from datasets.table import InMemoryTable

    if data is None:
        from .legacy import load_rows_data

        dirs = [store.root / s["file"] for s in store.manifest.shards] if store.is_legacy else [store.root]
        parts = [load_rows_data(d) for d in dirs]  # the rows saved beside the store (data.hf), if any
        if all(p is not None for p in parts):
            data = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    table = gradients_table(store)
    if data is not None:
        if "gradients" in data.column_names:
            raise BergsonError(
                "the dataset given to to_dataset already has a 'gradients' column; remove it first"
            )
        table = table.drop_columns([c for c in META_COLUMNS if c in data.column_names])
    key = f"{store.root.resolve()}\x00{store.manifest.to_json()}"
    view = Dataset(InMemoryTable(table), fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16])
    if data is None:
        return view
    row_ids = store.rows["row_id"]
    if int(row_ids.max(initial=-1)) >= len(data):
        raise BergsonError(
            f"the dataset given to to_dataset has {len(data)} rows, but the store holds row {int(row_ids.max())}; "
            "pass the dataset the store was built from"
        )
    if not np.array_equal(row_ids, np.arange(len(data))):
        data = data.select(row_ids)
    return concatenate_datasets([data, view], axis=1)
