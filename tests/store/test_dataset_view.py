"""A store as a ``datasets.Dataset``: the store's rows exactly, the documents' columns beside
them, and no copy of the vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

from bergson import BergsonError, load_gradient_dataset, load_gradients
from tests.helpers.stores import synthetic_store


def _anon_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon")


def test_view_is_the_rows_of_every_shard_without_a_copy(tmp_path):
    values = np.random.default_rng(0).standard_normal((250, 16)).astype(np.float16)
    synthetic_store(tmp_path / "s", values, {"a": 5, "b": 11}, shard_size=100)
    store = load_gradients(tmp_path / "s")
    assert len(store.manifest.shards) == 3
    view = store.to_dataset()
    assert view.column_names == ["row_id", "num_tokens", "loss", "gradients"]
    got = np.asarray(view.with_format("numpy")["gradients"])
    assert got.shape == (250, 16)
    np.testing.assert_array_equal(got, values.astype(got.dtype))  # float16 -> float32 is exact
    np.testing.assert_array_equal(view["row_id"], store.rows["row_id"])
    np.testing.assert_array_equal(view["num_tokens"], store.rows["num_tokens"])
    np.testing.assert_array_equal(np.asarray(view["loss"], np.float32), store.rows["loss"])
    # each shard's chunk is the memory-mapped file's own memory
    chunks = view.data.table.column("gradients").chunks
    assert len(chunks) == 3
    for chunk, part in zip(chunks, store._parts):
        assert chunk.values.buffers()[1].address == part.ctypes.data
    assert load_gradient_dataset(tmp_path / "s")["gradients"][249] == values[249].astype(np.float32).tolist()


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads RssAnon from /proc")
def test_view_of_a_large_store_does_not_grow_memory(tmp_path):
    rows, dim = 4096, 8192  # 64 MiB of float16
    synthetic_store(tmp_path / "big", np.ones((rows, dim), np.float16), shard_size=1500)
    store = load_gradients(tmp_path / "big")
    before = _anon_rss_mb()
    view = store.to_dataset()
    total = sum(float(np.asarray(view[i]["gradients"], np.float32).sum()) for i in range(0, rows, 512))
    assert total == 8 * dim
    assert _anon_rss_mb() - before < 16, "the view copied the store into memory"


def test_documents_columns_join_by_row_id(tmp_path):
    values = np.arange(12, dtype=np.float32).reshape(6, 2)
    synthetic_store(tmp_path / "s", values, dtype="float32", shard_size=4)
    store = load_gradients(tmp_path / "s")
    docs = Dataset.from_dict({"text": [f"doc {i}" for i in range(6)], "loss": [9.0] * 6})
    view = store.to_dataset(docs)
    assert view.column_names == [
        "text",
        "loss",
        "row_id",
        "num_tokens",
        "gradients",
    ]  # the documents' loss wins
    assert view[4]["text"] == "doc 4" and view[4]["gradients"] == [8.0, 9.0]
    with pytest.raises(BergsonError, match="has 3 rows"):
        store.to_dataset(docs.select(range(3)))
    with pytest.raises(BergsonError, match="'gradients' column"):
        store.to_dataset(docs.add_column("gradients", [[0.0]] * 6))
