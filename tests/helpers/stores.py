"""Stores for the tests: the options of a small build of the test corpus (:func:`make_cfg`), and
complete gradient stores written straight from numpy arrays (:func:`synthetic_store`)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from bergson import IndexConfig
from bergson.config import DataConfig
from bergson.store import GradientStore, Manifest, ModuleLayout, StoreWriter, load_gradients


def make_cfg(tmp_path: Path, model_dir: Path, corpus_file: Path, name: str = "index", **kw) -> IndexConfig:
    data = kw.pop("data", None) or DataConfig(dataset=str(corpus_file), truncation=True)
    return IndexConfig(
        run_path=str(tmp_path / name),
        model=str(model_dir),
        data=data,
        token_batch_size=kw.pop("token_batch_size", 256),
        projection_dim=kw.pop("projection_dim", 4),
        **kw,
    )


def synthetic_store(
    path: str | Path,
    array: np.ndarray,
    module_dims: Mapping[str, int] | Sequence[int] | None = None,
    dtype: str = "float16",
    *,
    shard_size: int = 1000,
    overwrite: bool = False,
) -> GradientStore:
    """Write ``array`` [rows, dim] as a complete store of ``shard_size`` rows per shard.

    ``module_dims`` splits the columns into modules: a mapping name -> width, or a list of
    widths (named ``m0``, ``m1``, ...); by default one module spans every column. The
    manifest's ``data`` field holds a hash of the array, so a store rewritten with other
    values has a different manifest.
    """
    array = np.asarray(array)
    rows, dim = array.shape
    if module_dims is None:
        module_dims = [dim]
    named = (
        dict(module_dims)
        if isinstance(module_dims, Mapping)
        else {f"m{i}": int(d) for i, d in enumerate(module_dims)}
    )
    assert sum(named.values()) == dim, f"module widths {named} do not add up to {dim}"
    layouts, offset = [], 0
    for name, width in named.items():
        layouts.append(ModuleLayout(name, "Linear", [width, 1], False, offset, width))
        offset += width
    manifest = Manifest(
        kind="gradients",
        status="in_progress",
        model={"name": "synthetic", "revision": None},
        modules=layouts,
        projection={"kind": "none", "dim": 0, "seed": 0, "include_bias": False},
        normalizer=None,
        preconditioner=None,
        loss={"kind": "causal_lm", "reduction": "sum"},
        dtype=dtype,
        num_rows=rows,
        data={
            "dataset": "synthetic",
            "sha256": hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest(),
        },
        plan={"shard_size": shard_size},
    )
    writer = StoreWriter(path, manifest, overwrite=overwrite)
    starts = list(range(0, rows, shard_size)) or [0]
    for i, start in enumerate(starts):
        stop = min(start + shard_size, rows)
        writer.begin_shard(i, range(start, stop))
        ids = np.arange(start, stop)
        writer.write(ids, array[start:stop], np.ones(len(ids), np.int64), np.zeros(len(ids), np.float32))
        writer.end_shard(i)
    writer.finalize(len(starts))
    return load_gradients(path)
