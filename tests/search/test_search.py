"""Search: exact top-k against brute force, FAISS against exact, index reuse, bad input."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from bergson import BergsonError
from bergson.search import FaissConfig, exact_topk, faiss_topk, load_or_build_index
from bergson.search.faiss_index import index_dir
from tests.helpers.stores import synthetic_store

faiss = pytest.importorskip("faiss")


def reference_topk(scores: np.ndarray, k: int, reverse: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k of a full [Q, N] score matrix: best first, ties by lower row."""
    key = scores if reverse else -scores
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def stored(store) -> np.ndarray:
    """The store's rows as float64, exactly as stored (after the float16 cast)."""
    return np.asarray(store.all, dtype=np.float64)


def cosine(q: np.ndarray, x: np.ndarray) -> np.ndarray:
    qn = np.linalg.norm(q, axis=1, keepdims=True)
    xn = np.linalg.norm(x, axis=1, keepdims=True)
    return (q / qn) @ np.divide(x, xn, out=np.zeros_like(x), where=xn > 0).T


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth)]))


@pytest.fixture(scope="module")
def int_store(tmp_path_factory):
    """Small-integer rows: every score is an exact integer, so ties are common and exact."""
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, size=(2500, 24)).astype(np.float32)
    x[100:110] = x[5]  # identical rows: exact ties across a shard boundary
    return synthetic_store(tmp_path_factory.mktemp("int") / "store", x, shard_size=300)


@pytest.fixture(scope="module")
def float_store(tmp_path_factory):
    """Gaussian rows in three modules, with a few all-zero rows (empty documents)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3000, 48)).astype(np.float32)
    x[[0, 17, 2999]] = 0.0
    return synthetic_store(
        tmp_path_factory.mktemp("float") / "store", x, {"a": 10, "b": 20, "c": 18}, shard_size=700
    )


# ------------------------------------------------------------------------- exact
@pytest.mark.parametrize("block_rows", [1, 7, 64, 299, 300, 1000, 65536])
@pytest.mark.parametrize("reverse", [False, True])
def test_exact_equals_bruteforce_with_ties(int_store, block_rows, reverse):
    rng = np.random.default_rng(2)
    q = rng.integers(-2, 3, size=(6, 24)).astype(np.float32)
    q[0] = 0.0  # every row ties at 0: the answer must be rows 0..k-1
    k = 10
    scores, idx = exact_topk(int_store, q, k, block_rows=block_rows, reverse=reverse)
    ref_s, ref_i = reference_topk(q.astype(np.float64) @ stored(int_store).T, k, reverse)
    assert scores.dtype == np.float32 and idx.dtype == np.int64
    assert scores.shape == idx.shape == (6, k)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_array_equal(scores, ref_s)
    np.testing.assert_array_equal(idx[0], np.arange(k))


@pytest.mark.parametrize("block_rows", [3, 256, 700, 65536])
def test_exact_equals_bruteforce_float(float_store, block_rows):
    q = np.random.default_rng(3).standard_normal((9, 48))
    scores, idx = exact_topk(float_store, q, 25, block_rows=block_rows)
    full = q.astype(np.float32).astype(np.float64) @ stored(float_store).T
    ref_s, ref_i = reference_topk(full, 25)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(scores, ref_s, rtol=1e-5, atol=1e-5)


def test_exact_accepts_arrays_paths_and_single_queries(float_store):
    q = np.random.default_rng(4).standard_normal(48)
    s1, i1 = exact_topk(float_store, q, 5)
    _, i2 = exact_topk(float_store.root, q[None], 5)
    s3, i3 = exact_topk(stored(float_store).astype(np.float16), q, 5, block_rows=128)
    assert i1.shape == (1, 5)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(i1, i3)
    np.testing.assert_allclose(s1, s3, rtol=1e-6)


def test_k_larger_than_rows_returns_all_rows(tmp_path):
    x = np.random.default_rng(5).standard_normal((13, 8))
    store = synthetic_store(tmp_path / "s", x, shard_size=5)
    q = np.random.default_rng(6).standard_normal((2, 8))
    scores, idx = exact_topk(store, q, 100, block_rows=4)
    assert idx.shape == (2, 13)
    assert (np.sort(idx, axis=1) == np.arange(13)).all()
    assert (np.diff(scores, axis=1) <= 0).all()


def test_unit_norm_is_cosine_and_zero_rows_score_zero(float_store):
    q = np.random.default_rng(7).standard_normal((4, 48))
    n = len(float_store)
    scores, idx = exact_topk(float_store, q, n, unit_norm=True, block_rows=500)
    assert not np.isnan(scores).any()
    full = cosine(q.astype(np.float32).astype(np.float64), stored(float_store))
    np.testing.assert_allclose(scores, np.take_along_axis(full, idx, axis=1), atol=1e-5)
    _, top_i = exact_topk(float_store, q, 10, unit_norm=True)
    np.testing.assert_array_equal(top_i, reference_topk(full, 10)[1])
    for z in (0, 17, 2999):
        np.testing.assert_array_equal(scores[idx == z], 0.0)
    # A zero query is not an error: every row scores 0 and ties go to the lowest rows.
    zs, zi = exact_topk(float_store, np.zeros((1, 48)), 3, unit_norm=True)
    np.testing.assert_array_equal(zs, 0.0)
    np.testing.assert_array_equal(zi, [[0, 1, 2]])


def test_reverse_returns_opponents(float_store):
    q = np.random.default_rng(8).standard_normal((3, 48))
    scores, idx = exact_topk(float_store, q, 7, reverse=True)
    full = q.astype(np.float32).astype(np.float64) @ stored(float_store).T
    ref_s, ref_i = reference_topk(full, 7, reverse=True)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(scores, ref_s, rtol=1e-5)
    assert (scores < 0).all() and (np.diff(scores, axis=1) >= 0).all()


def test_module_restriction(float_store):
    x = stored(float_store)
    rng = np.random.default_rng(9)
    q_ca = rng.standard_normal((3, 28))  # module c's 18 columns, then a's 10
    x_ca = np.concatenate([x[:, 30:48], x[:, 0:10]], axis=1)
    for block_rows in (64, 65536):
        scores, idx = exact_topk(float_store, q_ca, 12, modules=["c", "a"], block_rows=block_rows)
        ref_s, ref_i = reference_topk(q_ca.astype(np.float32).astype(np.float64) @ x_ca.T, 12)
        np.testing.assert_array_equal(idx, ref_i)
        np.testing.assert_allclose(scores, ref_s, rtol=1e-5, atol=1e-5)
    # A full-width query is sliced to the same columns.
    q_full = np.zeros((3, 48))
    q_full[:, 30:48], q_full[:, 0:10] = q_ca[:, :18], q_ca[:, 18:]
    np.testing.assert_array_equal(exact_topk(float_store, q_full, 12, modules=["c", "a"])[1], ref_i)
    # Unit norm over a module subset normalizes by that subset's norm.
    s_b, i_b = exact_topk(float_store, q_ca[:, :20], 5, modules=["b"], unit_norm=True)
    ref_s, ref_i = reference_topk(cosine(q_ca[:, :20].astype(np.float32).astype(np.float64), x[:, 10:30]), 5)
    np.testing.assert_array_equal(i_b, ref_i)
    np.testing.assert_allclose(s_b, ref_s, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"queries": np.zeros((2, 47))}, "expected 48 columns, got 47"),
        ({"queries": np.zeros((0, 48))}, "queries is empty"),
        ({"queries": np.zeros((2, 48)), "k": 0}, "k must be a positive integer"),
        ({"queries": np.full((1, 48), np.nan)}, "NaN or inf"),
        ({"queries": np.zeros((1, 48)), "modules": ["nope"]}, "no module 'nope'"),
        ({"queries": np.zeros((1, 48)), "modules": ["a", "a"]}, "lists a module twice"),
        ({"queries": np.zeros((1, 28)), "modules": ["a", "b"]}, "expected 30 columns"),
        ({"queries": np.zeros((1, 48)), "block_rows": 0}, "block_rows must be >= 1"),
    ],
)
def test_exact_bad_input(float_store, kwargs, message):
    kwargs = {"k": 5, **kwargs}
    with pytest.raises(BergsonError, match=message):
        exact_topk(float_store, **kwargs)


def test_exact_bad_store_input(float_store):
    with pytest.raises(BergsonError, match="needs a GradientStore"):
        exact_topk(np.zeros((4, 3)), np.zeros(3), 2, modules=["a"])
    with pytest.raises(BergsonError, match="2-D"):
        exact_topk(np.zeros(4), np.zeros(4), 2)


# ------------------------------------------------------------------------- the chunked kernel
@pytest.mark.parametrize("chunk_bytes", [24 * 4 * 64, 24 * 4 * 100, 1 << 20])
@pytest.mark.parametrize("num_threads", [1, 2])
def test_chunked_scan_equals_bruteforce_bit_for_bit(int_store, monkeypatch, chunk_bytes, num_threads):
    """Chunks of 64 rows (the grouped look), 100 rows (a row-by-row look) and the default size,
    one or two workers: integer scores are exact, so the result equals brute force exactly,
    ties (every row ties for query 0; rows 100..109 equal row 5) included."""
    from bergson.search import exact, scan

    monkeypatch.setattr(scan, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(exact, "_DENSE_BELOW", 1)  # the candidate kernel at any number of queries
    rng = np.random.default_rng(20)
    q = rng.integers(-2, 3, size=(5, 24)).astype(np.float32)
    q[0] = 0.0
    q[1] = stored(int_store)[5]  # rows 5 and 100..109 tie at the top
    for reverse in (False, True):
        scores, idx = exact_topk(int_store, q, 12, reverse=reverse, num_threads=num_threads, block_rows=1000)
        ref_s, ref_i = reference_topk(q.astype(np.float64) @ stored(int_store).T, 12, reverse)
        np.testing.assert_array_equal(idx, ref_i)
        np.testing.assert_array_equal(scores, ref_s)
    assert list(exact_topk(int_store, q[1], 11)[1][0]) == [5, *range(100, 110)]


def test_chunked_scan_equals_dense_float32(float_store, monkeypatch):
    """The candidate kernel against one dense float32 matmul of the whole store and against the
    dense block kernel (the one used below 32 queries): same rows, scores within 2 float32 ulps
    (the sum order inside a matmul differs)."""
    import torch

    from bergson.search import exact, scan

    monkeypatch.setattr(scan, "CHUNK_BYTES", 48 * 4 * 128)
    monkeypatch.setattr(exact, "_DENSE_BELOW", 1)
    q = np.random.default_rng(21).standard_normal((17, 48)).astype(np.float32)
    dense = (torch.from_numpy(q) @ torch.from_numpy(np.asarray(float_store.all, np.float32)).T).numpy()
    ref_s, ref_i = reference_topk(dense, 20)
    scores, idx = exact_topk(float_store, q, 20, num_threads=2, block_rows=1000)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_array_max_ulp(scores, ref_s.astype(np.float32), maxulp=2)
    monkeypatch.setattr(exact, "_DENSE_BELOW", 1000)
    dense_s, dense_i = exact_topk(float_store, q, 20, num_threads=2, block_rows=1000)
    np.testing.assert_array_equal(dense_i, idx)
    np.testing.assert_array_max_ulp(dense_s, scores, maxulp=2)


# ------------------------------------------------------------------------- int8 + re-rank
@pytest.fixture(scope="module")
def planted_store(tmp_path_factory):
    """Noise rows, and for each of 8 queries 5 planted rows well above the noise (separated by
    more than int8 rounding can move a score), spread over shards."""
    rng = np.random.default_rng(30)
    x = rng.standard_normal((6000, 64)).astype(np.float32)
    q = rng.standard_normal((8, 64)).astype(np.float32)
    planted = rng.choice(6000, size=(8, 5), replace=False)
    for i in range(8):
        for j, r in enumerate(planted[i]):
            x[r] = q[i] * (1.0 + 0.3 * (j + 1)) + 0.05 * rng.standard_normal(64)
    store = synthetic_store(
        tmp_path_factory.mktemp("planted") / "store", x, {"a": 40, "b": 24}, shard_size=1500
    )
    return store, q


@pytest.mark.parametrize("unit_norm", [False, True])
@pytest.mark.parametrize("num_threads", [1, 2])
def test_int8_rerank_equals_exact_on_a_separated_store(planted_store, unit_norm, num_threads):
    store, q = planted_store
    es, ei = exact_topk(store, q, 5, unit_norm=unit_norm)
    for factor in (1, 3):
        s, i = exact_topk(store, q, 5, unit_norm=unit_norm, int8_rerank=factor, num_threads=num_threads)
        np.testing.assert_array_equal(i, ei)
        np.testing.assert_allclose(s, es, rtol=1e-6, atol=1e-6)  # re-scored exactly
    s, i = exact_topk(store, q, 5, reverse=True, int8_rerank=2)  # opponents: -q's planted rows
    es, ei = exact_topk(store, q, 5, reverse=True)
    np.testing.assert_array_equal(i[:, :1], ei[:, :1])
    np.testing.assert_allclose(s[:, 0], es[:, 0], rtol=1e-6)
    s, i = exact_topk(store, q[:, 40:], 5, modules=["b"], int8_rerank=4)
    np.testing.assert_array_equal(i, exact_topk(store, q[:, 40:], 5, modules=["b"])[1])


def test_int8_rerank_recall_on_gaussian_rows(float_store):
    """Without planted answers the re-rank is approximate; with 4x candidates it still finds
    nearly every row of the exact top 10 (and whatever it returns carries its exact score)."""
    q = np.random.default_rng(31).standard_normal((16, 48)).astype(np.float32)
    _, ei = exact_topk(float_store, q, 10)
    s, i = exact_topk(float_store, q, 10, int8_rerank=4)
    assert recall(i, ei) >= 0.95
    exact_scores = q.astype(np.float64) @ stored(float_store).T
    np.testing.assert_allclose(s, np.take_along_axis(exact_scores, i, axis=1), rtol=1e-5, atol=1e-5)


def test_int8_rerank_leaves_nonfinite_rows_out_and_pads(tmp_path, caplog):
    import logging

    x = np.random.default_rng(32).standard_normal((40, 8)).astype(np.float32)
    arr = x.astype(np.float16)
    arr[3, 0] = np.inf
    arr[7, 1] = np.nan
    with caplog.at_level(logging.WARNING, logger="bergson"):
        s, i = exact_topk(arr, np.ones(8), 45, int8_rerank=2)
    assert "2 stored rows hold non-finite values" in caplog.text
    good = np.setdiff1d(np.arange(40), [3, 7])
    assert sorted(i[0, :38]) == list(good) and (i[0, 38:] == -1).all() and np.isneginf(s[0, 38:]).all()


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_int8_rerank_bad_value(float_store, value):
    with pytest.raises(BergsonError, match="int8_rerank must be 0"):
        exact_topk(float_store, np.zeros(48), 5, int8_rerank=value)


# ------------------------------------------------------------------------- faiss
@pytest.mark.parametrize("num_shards", [1, 3])
@pytest.mark.parametrize("unit_norm", [False, True])
def test_faiss_flat_equals_exact(float_store, tmp_path, num_shards, unit_norm):
    q = np.random.default_rng(10).standard_normal((30, 48))
    cfg = FaissConfig(num_shards=num_shards)
    index = load_or_build_index(float_store, cfg, unit_norm=unit_norm)
    for reverse in (False, True):
        fs, fi = index.search(q, 10, reverse=reverse)
        es, ei = exact_topk(float_store, q, 10, unit_norm=unit_norm, reverse=reverse)
        np.testing.assert_array_equal(fi, ei)
        np.testing.assert_allclose(fs, es, rtol=1e-5, atol=1e-5)
    everything_s, _ = index.search(q[:2], len(float_store))
    assert not np.isnan(everything_s).any()


@pytest.fixture(scope="module")
def clustered_store(tmp_path_factory):
    """50k rows x 64 dims from a 100-component Gaussian mixture (unit-variance centres,
    noise 0.7), and 200 queries drawn from the same mixture."""
    rng = np.random.default_rng(11)
    centres = rng.standard_normal((100, 64))

    def sample(m: int) -> np.ndarray:
        return (centres[rng.integers(0, 100, m)] + 0.7 * rng.standard_normal((m, 64))).astype(np.float32)

    store = synthetic_store(tmp_path_factory.mktemp("clustered") / "store", sample(50_000), shard_size=20_000)
    return store, sample(200)


def test_faiss_ivf_recall(clustered_store):
    """IVF256 at the default nprobe=10 visits ~4% of the lists. The data has 100 clusters,
    so each cluster spans ~2.5 lists and a query's 10 nearest rows by inner product lie in
    lists near its own cluster: ten probed lists cover them. FAISS 1.15 gets recall@10 =
    1.0 here; the floor of 0.95 leaves room for other k-means initialisations across FAISS
    versions. nprobe=1 must do clearly worse (~0.6), which shows nprobe is applied."""
    store, q = clustered_store
    _, truth = exact_topk(store, q, 10)
    index = load_or_build_index(store, FaissConfig(index_factory="IVF256,Flat", max_train_examples=20_000))
    _, found = index.search(q, 10)
    assert recall(found, truth) >= 0.95
    index.set_nprobe(1)
    _, found1 = index.search(q, 10)
    assert recall(found1, truth) < 0.85


def test_faiss_index_reused_then_rebuilt_when_store_changes(tmp_path):
    rng = np.random.default_rng(12)
    x = rng.standard_normal((500, 16))
    store = synthetic_store(tmp_path / "s", x, shard_size=200)
    cfg = FaissConfig(index_factory="IVF4,Flat", num_shards=2)
    first = load_or_build_index(store, cfg)
    assert first.built
    path = index_dir(store, "IVF4,Flat", unit_norm=False)
    assert path == tmp_path / "s" / "faiss" / "IVF4_Flat-raw"
    files = sorted(path.glob("*.faiss"))
    assert len(files) == 2
    mtimes = [f.stat().st_mtime_ns for f in files] + [(path / "manifest.json").stat().st_mtime_ns]

    second = load_or_build_index(tmp_path / "s", cfg)
    assert not second.built
    assert [f.stat().st_mtime_ns for f in files] + [(path / "manifest.json").stat().st_mtime_ns] == mtimes
    q = rng.standard_normal((3, 16))
    np.testing.assert_array_equal(first.search(q, 5)[1], second.search(q, 5)[1])

    # Other data under the same path: the store's manifest changes, so the index is rebuilt.
    y = rng.standard_normal((500, 16))
    changed = synthetic_store(tmp_path / "s", y, shard_size=200, overwrite=True)
    third = load_or_build_index(changed, cfg)
    assert third.built
    assert sorted(path.glob("*.faiss")) != files  # new build id, old files removed
    assert len(list(path.glob("*.faiss"))) == 2
    assert not list(path.glob("*.tmp")) and not list(path.glob(".*.tmp"))
    flat_truth = exact_topk(changed, q, 5)[1]
    third.set_nprobe(4)  # every list: exact
    np.testing.assert_array_equal(third.search(q, 5)[1], flat_truth)

    # Other build options get their own directory or trigger a rebuild.
    assert load_or_build_index(changed, FaissConfig(index_factory="IVF4,Flat", num_shards=1)).built
    assert load_or_build_index(changed, cfg, unit_norm=True).path.name == "IVF4_Flat-unit"


def test_faiss_mmap_index(float_store):
    q = np.random.default_rng(13).standard_normal((4, 48))
    built = load_or_build_index(float_store, FaissConfig(index_factory="IVF8,Flat", nprobe=8))
    mapped = load_or_build_index(
        float_store, FaissConfig(index_factory="IVF8,Flat", nprobe=8, mmap_index=True)
    )
    assert not mapped.built
    s1, i1 = built.search(q, 10)
    s2, i2 = mapped.search(q, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(i2, exact_topk(float_store, q, 10)[1])


def test_faiss_topk_convenience_and_k_beyond_rows(tmp_path):
    x = np.random.default_rng(14).standard_normal((9, 4))
    store = synthetic_store(tmp_path / "s", x, shard_size=4)
    q = np.ones((1, 4))
    _, idx = faiss_topk(store, q, 50, FaissConfig(num_shards=3))
    assert idx.shape == (1, 9)
    np.testing.assert_array_equal(idx, exact_topk(store, q, 50)[1])


def test_faiss_bad_input(float_store, tmp_path, monkeypatch):
    with pytest.raises(BergsonError, match="index_factory 'Bogus7'"):
        load_or_build_index(float_store, FaissConfig(index_factory="Bogus7"))
    with pytest.raises(BergsonError, match="num_shards 5000 exceeds"):
        load_or_build_index(float_store, FaissConfig(num_shards=5000))
    with pytest.raises(BergsonError, match="nprobe must be >= 1"):
        load_or_build_index(float_store, FaissConfig(nprobe=0))
    with pytest.raises(BergsonError, match="training the FAISS index"):
        load_or_build_index(float_store, FaissConfig(index_factory="IVF64,Flat", max_train_examples=10))
    with pytest.raises(BergsonError, match="pass a GradientStore"):
        load_or_build_index(np.zeros((3, 3)))  # type: ignore[arg-type]
    index = load_or_build_index(float_store)
    with pytest.raises(BergsonError, match="expected 48 columns, got 3"):
        index.search(np.zeros((1, 3)), 5)
    with pytest.raises(BergsonError, match="k must be a positive integer"):
        index.search(np.zeros((1, 48)), 0)
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(BergsonError, match=r"pip install 'bergson\[faiss\]'"):
        load_or_build_index(float_store)


def test_search_package_imports_neither_torch_nor_faiss():
    import subprocess

    code = "import sys, bergson.search; print('torch' in sys.modules, 'faiss' in sys.modules)"
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root, env=os.environ
    )
    assert out.stdout.split() == ["False", "False"]


def test_int8_copy_is_written_once_reused_and_rewritten_when_the_store_changes(tmp_path, caplog):
    import logging
    import shutil

    from bergson.search.int8_copy import load_int8_copy
    from bergson.store import load_gradients

    x = np.random.default_rng(33).standard_normal((300, 16)).astype(np.float32)
    store = synthetic_store(tmp_path / "s", x, shard_size=128)
    q = x[[4, 250]] * 3
    with caplog.at_level(logging.WARNING, logger="bergson"):
        _, i1 = exact_topk(store, q, 3, int8_rerank=2)
    assert caplog.text.count("writing an int8 copy") == 1
    rows8, scales, _, order = load_int8_copy(store)
    # the copy row j holds store row order[j]: a permutation within each block, by descending scale
    assert sorted(order[:128]) == list(range(128)) and sorted(order) == list(range(300))
    assert (np.diff(scales[:128]) <= 0).all()
    np.testing.assert_allclose(
        rows8 * (scales[:, None] / 127), stored(store)[order], atol=scales.max() / 254 + 1e-6
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bergson"):
        _, i2 = exact_topk(store, q, 3, int8_rerank=2)
    assert "writing" not in caplog.text  # reused
    assert load_int8_copy(store)[0] is rows8  # and its mapping kept on the open store
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(i1, exact_topk(store, q, 3)[1])
    # an older store holding non-finite rows: the copy marks them, the search leaves them out
    root = tmp_path / "older"
    shutil.copytree(store.root, root)
    shutil.rmtree(root / "int8")
    npy = root / "shards/00000.npy"
    shard = np.load(npy)
    shard[4, 0] = np.inf
    np.save(npy, shard)
    older = load_gradients(root)
    with caplog.at_level(logging.WARNING, logger="bergson"):
        _, i3 = exact_topk(older, q, 3, int8_rerank=2)
    assert "1 stored rows hold non-finite values" in caplog.text
    assert 4 not in i3
    np.testing.assert_array_equal(i3, exact_topk(older, q, 3)[1])
    # a rebuilt store (new manifest): the copy is stale and rewritten
    store = synthetic_store(tmp_path / "s", -x, shard_size=128, overwrite=True)
    assert load_int8_copy(store) is None
    _, i4 = exact_topk(store, -q, 3, int8_rerank=2)
    np.testing.assert_array_equal(i4, i1)
