"""`score` and `reduce` against the inner products of stored vectors."""

from __future__ import annotations

import numpy as np
import pytest

from bergson import BergsonError, build
from bergson.config import DataConfig, ReduceConfig, ScoreConfig
from bergson.reduction import reduce
from bergson.scoring import score
from tests.helpers.stores import make_cfg


def _score_cfg(tmp_path, model_dir, corpus_file, query_path, name="scores", **kw) -> ScoreConfig:
    base = make_cfg(tmp_path, model_dir, corpus_file, name=name, save_dtype="float32")
    return ScoreConfig(**{**vars(base), "query_path": str(query_path), **kw})


@pytest.fixture(scope="module")
def stores(tmp_path_factory, model_dir, corpus_file):
    tmp = tmp_path_factory.mktemp("stores")
    train = build(make_cfg(tmp, model_dir, corpus_file, name="train", save_dtype="float32"))
    qdata = DataConfig(dataset=str(corpus_file), split="train[3:6]", truncation=True)
    query = build(make_cfg(tmp, model_dir, corpus_file, name="query", save_dtype="float32", data=qdata))
    return train, query


def cos(a: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.where(n == 0, 1, n)


@pytest.mark.parametrize("unit", [False, True])
def test_individual_scores_are_inner_products(tmp_path, model_dir, corpus_file, stores, unit, caplog):
    train, query = stores
    with caplog.at_level("INFO", logger="bergson"):
        s = score(_score_cfg(tmp_path, model_dir, corpus_file, query.root, unit_normalize=unit))
    # the run says how much of the model it tracks, as a build does
    assert "tracking 100.0% of the model's matrix weights" in caplog.text
    t, q = np.asarray(train.all, np.float64), np.asarray(query.all, np.float64)
    expected = cos(t) @ cos(q).T if unit else t @ q.T
    got = np.asarray(s["scores"])
    assert got.shape == (24, 3) and s.manifest.kind == "scores"
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    assert "lowers the query's loss" in s.manifest.score["orientation"]
    # a document scores itself highest among the three query copies (rows 3..5)
    if unit:
        assert np.allclose(got[[3, 4, 5], [0, 1, 2]], 1, atol=1e-4)


def test_existing_index_equals_dataset_pass(tmp_path, model_dir, corpus_file, stores):
    train, query = stores
    a = score(_score_cfg(tmp_path, model_dir, corpus_file, query.root, name="a", score="mean"))
    b = score(
        _score_cfg(
            tmp_path, model_dir, corpus_file, query.root, name="b", score="mean", index=str(train.root)
        )
    )
    np.testing.assert_allclose(np.asarray(a["scores"]), np.asarray(b["scores"]), rtol=1e-4, atol=1e-6)
    t, q = np.asarray(train.all, np.float64), np.asarray(query.all, np.float64)
    np.testing.assert_allclose(np.asarray(b["scores"])[:, 0], (t @ q.T).mean(1), rtol=1e-4)
    m = score(
        _score_cfg(tmp_path, model_dir, corpus_file, query.root, name="m", score="max", index=str(train.root))
    )
    np.testing.assert_allclose(np.asarray(m["scores"])[:, 0], (t @ q.T).max(1), rtol=1e-4)


def test_reduce_from_dataset_equals_from_index(tmp_path, model_dir, corpus_file, stores):
    train, _ = stores
    base = make_cfg(tmp_path, model_dir, corpus_file, name="r1", save_dtype="float32")
    r1 = reduce(ReduceConfig(**{**vars(base), "unit_normalize": True, "aggregation": "mean"}))
    r2 = reduce(
        ReduceConfig(
            **{
                **vars(base),
                "run_path": str(tmp_path / "r2"),
                "unit_normalize": True,
                "aggregation": "mean",
                "index": str(train.root),
            }
        )
    )
    expected = cos(np.asarray(train.all, np.float64)).mean(0)
    for r in (r1, r2):
        assert len(r) == 1 and r.manifest.kind == "aggregate"
        np.testing.assert_allclose(np.asarray(r.all)[0], expected, rtol=1e-4, atol=1e-7)


def test_mismatched_query_is_a_clear_error(tmp_path, model_dir, corpus_file, stores):
    train, _ = stores
    other = build(
        make_cfg(tmp_path, model_dir, corpus_file, name="p8", projection_dim=8, save_dtype="float32")
    )
    with pytest.raises(BergsonError, match="projection differs"):
        score(_score_cfg(tmp_path, model_dir, corpus_file, other.root))
    with pytest.raises(BergsonError, match="projection differs"):
        score(_score_cfg(tmp_path, model_dir, corpus_file, other.root, name="x", index=str(train.root)))
    with pytest.raises(BergsonError, match="not a bergson store"):
        score(_score_cfg(tmp_path, model_dir, corpus_file, tmp_path / "nothing"))


def test_normalizers_travel_with_the_query_store(tmp_path, model_dir, corpus_file):
    """A query store built with normalizers hands them to `score` and the Attributor."""
    import torch

    from bergson import AdafactorNormalizer, Attributor
    from bergson.core.layout import module_shape
    from bergson.models import find_tracked_modules, load_model

    cfg = make_cfg(tmp_path, model_dir, corpus_file, name="train", save_dtype="float32")
    model, _ = load_model(cfg)
    gen = torch.Generator().manual_seed(0)
    norms = {}
    for name, m in find_tracked_modules(model).items():
        out, n_in = module_shape(m)
        norms[name] = AdafactorNormalizer(
            torch.rand(out, generator=gen) + 0.5, torch.rand(n_in, generator=gen) + 0.5
        )
    train = build(cfg, normalizers=norms)
    qdata = DataConfig(dataset=str(corpus_file), split="train[:2]", truncation=True)
    query = build(
        make_cfg(tmp_path, model_dir, corpus_file, name="q", save_dtype="float32", data=qdata),
        normalizers=norms,
    )
    assert (
        query.manifest.normalizer == train.manifest.normalizer
        and query.manifest.normalizer["kind"] == "adafactor"
    )
    s = score(_score_cfg(tmp_path, model_dir, corpus_file, query.root))
    expected = np.asarray(train.all, np.float64) @ np.asarray(query.all, np.float64).T
    np.testing.assert_allclose(
        np.asarray(s["scores"]), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max()
    )
    # unnormalized rows would differ: the normalizer really was applied
    plain = build(make_cfg(tmp_path, model_dir, corpus_file, name="plain", save_dtype="float32"))
    assert not np.allclose(np.asarray(plain.all), np.asarray(train.all), rtol=1e-2)
    assert set(Attributor(query.root).normalizers) == set(norms)


def test_grouped_max_is_max_over_group_means(tmp_path, model_dir, corpus_file, stores):
    import json

    train, _ = stores
    rows = [json.loads(line) for line in corpus_file.read_text().splitlines()][:4]
    qfile = tmp_path / "tasks.jsonl"
    qfile.write_text("".join(json.dumps({"text": r["text"], "task": t}) + "\n" for r, t in zip(rows, "abba")))
    qdata = DataConfig(dataset=str(qfile), truncation=True)
    query = build(make_cfg(tmp_path, model_dir, corpus_file, name="tq", save_dtype="float32", data=qdata))
    s = score(
        _score_cfg(
            tmp_path,
            model_dir,
            corpus_file,
            query.root,
            score="max",
            query_group_column="task",
            index=str(train.root),
        )
    )
    raw = np.asarray(train.all, np.float64) @ np.asarray(query.all, np.float64).T
    expected = np.maximum(raw[:, [0, 3]].mean(1), raw[:, [1, 2]].mean(1))
    np.testing.assert_allclose(np.asarray(s["scores"])[:, 0], expected, rtol=1e-4)
