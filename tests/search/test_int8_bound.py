"""Exact search through the int8 copy's bounds (``exact_topk(int8_prefilter=True)``).

Ground truth: every row's bounds hold the float32 and the float64 score on rows of very different
scales, sparse and zero rows; and the search returns what the float32 scan returns, ties included.
"""

from __future__ import annotations

import logging
import weakref

import numpy as np
import pytest

from bergson import BergsonError
from bergson.search import exact_topk, int8_bound
from bergson.search.exact import column_segments, prepare_queries
from bergson.search.int8_copy import int8_copy, load_int8_copy
from tests.helpers.stores import synthetic_store


def heavy_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """Rows whose norms span five orders of magnitude, some with one dominant entry, some zero: the
    kind of spread real gradient stores have."""
    x = rng.standard_normal((n, dim)) * 10.0 ** rng.uniform(-3, 2, size=(n, 1))
    spiky = rng.choice(n, n // 10, replace=False)
    x[spiky, rng.integers(0, dim, len(spiky))] *= 20
    x[rng.choice(n, 5, replace=False)] = 0.0
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def heavy_store(tmp_path_factory):
    x = heavy_rows(np.random.default_rng(40), 4000, 40)
    return synthetic_store(tmp_path_factory.mktemp("heavy") / "store", x, {"a": 25, "b": 15}, shard_size=900)


@pytest.mark.parametrize("unit_norm", [False, True])
def test_bounds_hold_every_row_in_float32_and_float64(heavy_store, unit_norm):
    import torch

    rng = np.random.default_rng(41)
    queries = (rng.standard_normal((9, 40)) * 10.0 ** rng.uniform(-2, 2, size=(9, 1))).astype(np.float32)
    queries[0, 3] *= 30  # one dominant entry: a coarse int8 query
    segments, total = column_segments(heavy_store, None)
    q = prepare_queries(queries, segments, total, unit_norm=unit_norm, reverse=False)
    copy = int8_copy(heavy_store, option="test")
    scan = int8_bound.BoundedScanner(q, segments, total, k=5, unit_norm=unit_norm, num_threads=1)
    scan.prepare(copy.scales, copy.bounds)
    acc = torch._int_mm(torch.from_numpy(np.array(copy.rows)), scan.q8t.contiguous()).numpy()
    lower, upper = scan.bounds(acc, 0, len(acc))

    x = np.asarray(heavy_store.all, np.float32)[copy.order]  # the copy's rows are sorted by scale
    assert all((np.diff(copy.scales[s : s + 900]) <= 0).all() for s in range(0, 4000, 900))  # per shard
    ref32 = (torch.from_numpy(q) @ torch.from_numpy(x).T).numpy().T  # as the float32 scan computes it
    ref64 = x.astype(np.float64) @ q.astype(np.float64).T
    if unit_norm:
        norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
        ref32 = ref32 / np.where(norms > 0, norms, np.inf).astype(np.float32)
        ref64 = ref64 / np.where(norms > 0, norms, np.inf)
    assert np.isfinite(x).all()
    for ref in (ref32, ref64):
        assert (lower <= ref).all() and (ref <= upper).all()
    # and tight enough to be worth it: a few percent of the largest score the row could have
    size = np.linalg.norm(x, axis=1)[:, None] * np.linalg.norm(q, axis=1)
    if unit_norm:
        size = np.linalg.norm(q, axis=1)[None, :].repeat(len(x), 0)
    nonzero = np.linalg.norm(x, axis=1) > 0
    assert np.median((upper - lower)[nonzero] / size[nonzero]) < 0.05


@pytest.mark.parametrize("unit_norm", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("num_threads", [1, 2])
def test_prefilter_returns_the_exact_scan(heavy_store, monkeypatch, unit_norm, reverse, num_threads):
    # small chunks and blocks so that a search crosses many of both, and threads split them
    monkeypatch.setattr(int8_bound, "CHUNK_BYTES", 40 * 64)
    monkeypatch.setattr(int8_bound, "BLOCK_BYTES", 40 * 700)
    # the heavy rows' scales spread about 2.2x over a chunk of 64 sorted rows: allow 3x, so that most
    # chunks compare their integer products (exact whatever the ratio; only the speed depends on it)
    monkeypatch.setattr(int8_bound, "NARROW", 3.0)
    narrow: list[np.ndarray] = []
    prepare = int8_bound.BoundedScanner.prepare

    def spy(self, scales, bounds, factors=None):
        prepare(self, scales, bounds, factors)
        narrow.append(self.narrow)

    monkeypatch.setattr(int8_bound.BoundedScanner, "prepare", spy)
    computed: list[int] = []
    factors = int8_bound.block_factors

    def count(*args):
        computed.append(len(narrow) + 1)  # the prepare call it is for
        return factors(*args)

    monkeypatch.setattr(int8_bound, "block_factors", count)
    skipped: list[np.ndarray] = []
    thresholds = int8_bound.BoundedScanner._thresholds

    def record(self, t):
        out = thresholds(self, t)
        skipped.append(out[2])
        return out

    monkeypatch.setattr(int8_bound.BoundedScanner, "_thresholds", record)
    monkeypatch.setattr(int8_bound, "_FACTORS", weakref.WeakKeyDictionary())
    rng = np.random.default_rng(42)
    for num_q in (1, 7, 40):
        q = rng.standard_normal((num_q, 40)).astype(np.float32)
        kw = dict(unit_norm=unit_norm, reverse=reverse, num_threads=num_threads)
        es, ei = exact_topk(heavy_store, q, 10, **kw)
        s, i = exact_topk(heavy_store, q, 10, int8_prefilter=True, **kw)
        np.testing.assert_array_equal(i, ei)
        np.testing.assert_allclose(s, es, rtol=1e-6, atol=1e-30)
    # dot scores: chunks of rows sorted by scale compare integer products, the widest chunks scaled
    # ones; cosine scores (factors divided by the rows' norms: not sorted) scaled ones
    chunks = np.concatenate(narrow)
    assert (chunks.any() and not chunks.all()) if not unit_norm else not chunks.all()
    # each block's factors were computed by the first search and kept on the open store
    # dot scores: chunks of small rows (their norms times the query's below the threshold) are
    # passed over without products; cosine scores never
    assert np.concatenate(skipped).any() != unit_norm
    blocks = len(narrow) // 3  # three searches
    assert len(narrow) == 3 * blocks and computed == list(range(1, blocks + 1))


def test_a_chunk_is_passed_over_only_when_no_row_in_it_can_reach_the_threshold(tmp_path, monkeypatch):
    """A row parallel to the query scores exactly its norm times the query's, the largest score its
    chunk could have: the scan must not pass that chunk over, though the rows before it (larger
    scales, sorted first) already set a high threshold."""
    monkeypatch.setattr(int8_bound, "CHUNK_BYTES", 24 * 64)
    d = 24
    u = np.where(np.arange(d) % 2 == 0, 1.0, -1.0) / np.sqrt(d)  # the query: spread, unit norm
    x = np.zeros((511, d))
    x[:9, 0] = 10 * np.sqrt(d)  # nine rows of score 10 (scale 49)
    x[9, 2] = 3 * np.sqrt(d)  # one of score 3 (scale 14.7)
    rng = np.random.default_rng(46)
    x[np.arange(10, 210), rng.integers(0, d, 200)] = 5.0 * rng.choice([-1, 1], 200)  # score +-1.02
    x[210] = 5 * u  # parallel to the query: score 5 = its norm, scale 1.02 (a later chunk)
    x[211:] = rng.standard_normal((300, d)) * 0.01
    store = synthetic_store(tmp_path / "s", x.astype(np.float32))
    q = u[None].astype(np.float32)
    _, i = exact_topk(store, q, 10, int8_prefilter=True, num_threads=1)
    assert sorted(i[0].tolist()) == [*range(9), 210]
    np.testing.assert_array_equal(i, exact_topk(store, q, 10, num_threads=1)[1])


def test_kept_block_factors_follow_the_block_sizes(heavy_store, monkeypatch):
    """Searches of one open store with other block sizes (their blocks start at the same rows)
    each get their own blocks' factors."""
    monkeypatch.setattr(int8_bound, "BLOCK_BYTES", 40)  # the blocks are then --block_rows rows
    monkeypatch.setattr(int8_bound, "_FACTORS", weakref.WeakKeyDictionary())
    q = np.random.default_rng(45).standard_normal((4, 40)).astype(np.float32)
    expected = exact_topk(heavy_store, q, 5)[1]
    for rows in (700, 1400, 700, 4000):
        np.testing.assert_array_equal(
            exact_topk(heavy_store, q, 5, int8_prefilter=True, block_rows=rows)[1], expected
        )
    assert {key[:2] for key in int8_bound._FACTORS[heavy_store][1]} >= {(0, 700), (0, 1400), (0, 4000)}


def test_workers_shorten_the_switch_interval_and_restore_it(heavy_store, monkeypatch):
    """Several workers run with a short thread switch interval; one worker leaves it alone; it is
    restored after either."""
    import sys

    from bergson.search import scan

    seen = []
    split = scan.SingleThreadedWorkers.split

    def spy(self, *args):
        seen.append(sys.getswitchinterval())
        return split(self, *args)

    monkeypatch.setattr(scan.SingleThreadedWorkers, "split", spy)
    before = sys.getswitchinterval()
    q = np.random.default_rng(44).standard_normal((3, 40)).astype(np.float32)
    exact_topk(heavy_store, q, 5, int8_prefilter=True, num_threads=2)
    exact_topk(heavy_store, q, 5, int8_prefilter=True, num_threads=1)
    assert seen[0] == min(before, scan.SWITCH_INTERVAL_S) and seen[-1] == before
    assert sys.getswitchinterval() == before


def test_prefilter_keeps_exact_ties_and_their_order(tmp_path):
    """Integer rows: scores are exact integers, many equal; the order within a tie (ascending row)
    is the float32 scan's."""
    rng = np.random.default_rng(43)
    x = rng.integers(-3, 4, size=(3000, 24)).astype(np.float32)
    x[100:130] = x[5]
    store = synthetic_store(tmp_path / "s", x, shard_size=500)
    q = np.concatenate([x[[5]], rng.integers(-2, 3, size=(5, 24))]).astype(np.float32)
    for k in (1, 10, 50):
        es, ei = exact_topk(store, q, k)
        s, i = exact_topk(store, q, k, int8_prefilter=True)
        np.testing.assert_array_equal(i, ei)
        np.testing.assert_array_equal(s, es)


def test_prefilter_over_some_modules_and_its_fallbacks(heavy_store, monkeypatch, caplog):
    q = np.random.default_rng(44).standard_normal((4, 40)).astype(np.float32)
    # dot products over module b: the whole rows' norms still bound the subset's
    np.testing.assert_array_equal(
        exact_topk(heavy_store, q, 5, modules=["b"], int8_prefilter=True)[1],
        exact_topk(heavy_store, q, 5, modules=["b"])[1],
    )
    # cosine over a subset: the copy has no norms of those columns; said, and answered in float32
    with caplog.at_level(logging.WARNING, logger="bergson"):
        s, i = exact_topk(heavy_store, q, 5, modules=["b"], unit_norm=True, int8_prefilter=True)
    assert "cosine scores over a subset of modules" in caplog.text and "scanning in float32" in caplog.text
    np.testing.assert_array_equal(i, exact_topk(heavy_store, q, 5, modules=["b"], unit_norm=True)[1])
    # a zero query ties every row: the bounds cannot narrow it; said, and answered in float32
    caplog.clear()
    monkeypatch.setattr(int8_bound, "MAX_CANDIDATES", 100)
    zero = np.zeros((1, 40), np.float32)
    with caplog.at_level(logging.WARNING, logger="bergson"):
        s, i = exact_topk(heavy_store, zero, 3, int8_prefilter=True)
    assert "too close together" in caplog.text
    np.testing.assert_array_equal(i, [[0, 1, 2]])
    np.testing.assert_array_equal(s, 0.0)


def test_prefilter_leaves_nonfinite_rows_out(tmp_path, caplog):
    x = np.random.default_rng(45).standard_normal((500, 16)).astype(np.float32)
    store = synthetic_store(tmp_path / "s", x, shard_size=200)
    npy = store.root / "shards/00000.npy"
    shard = np.load(npy)
    shard[3, 0] = np.inf
    shard[7, 1] = np.nan
    np.save(npy, shard)
    from bergson.store import load_gradients

    store = load_gradients(store.root)
    q = x[[3, 7, 9]]
    with caplog.at_level(logging.WARNING, logger="bergson"):
        _, i = exact_topk(store, q, 4, int8_prefilter=True)
    assert "2 stored rows hold non-finite values" in caplog.text
    # against brute force over the finite rows; the float32 scan below 32 queries once got this
    # wrong (NaN-marked rows took places in its np.partition, and a row of the top 4 was lost)
    finite = np.asarray(store.all, np.float64)
    finite[[3, 7]] = 0.0
    ref = q.astype(np.float64) @ finite.T
    ref[:, [3, 7]] = -np.inf
    np.testing.assert_array_equal(i, np.argsort(-ref, axis=1, kind="stable")[:, :4])
    np.testing.assert_array_equal(i, exact_topk(store, q, 4)[1])


def test_prefilter_refusals_and_old_copies(heavy_store, tmp_path):
    q = np.ones((1, 40), np.float32)
    with pytest.raises(BergsonError, match="exclude each other"):
        exact_topk(heavy_store, q, 3, int8_prefilter=True, int8_rerank=2)
    with pytest.raises(BergsonError, match="needs a GradientStore"):
        exact_topk(np.asarray(heavy_store.all), q, 3, int8_prefilter=True)
    # a copy of an older format (2: rows in store order) is not used, and is rewritten
    x = np.random.default_rng(46).standard_normal((50, 8)).astype(np.float32)
    store = synthetic_store(tmp_path / "s", x, shard_size=50)
    int8_copy(store)
    meta = store.root / "int8" / "meta.json"
    meta.write_text(meta.read_text().replace('"format": 3', '"format": 2'))
    assert load_int8_copy(store) is None
    np.testing.assert_array_equal(
        exact_topk(store, x[:2], 3, int8_prefilter=True)[1], exact_topk(store, x[:2], 3)[1]
    )
    assert load_int8_copy(store) is not None


def test_a_store_of_one_column_through_the_int8_routes(tmp_path):
    """One column: a transposed view of the rows or the queries has strides (1, 1), which
    torch._int_mm misreads; both int8 routes must still return the float32 scan's answer."""
    rng = np.random.default_rng(47)
    x = (rng.standard_normal((600, 1)) * 10.0 ** rng.uniform(-2, 2, size=(600, 1))).astype(np.float32)
    store = synthetic_store(tmp_path / "s", x, shard_size=250)
    q = np.array([[1.5], [-0.25]], np.float32)
    es, ei = exact_topk(store, q, 7)
    for kw in ({"int8_prefilter": True}, {"int8_rerank": 2}):
        s, i = exact_topk(store, q, 7, **kw)
        np.testing.assert_array_equal(i, ei)
        np.testing.assert_allclose(s, es, rtol=1e-6)
