"""Preconditioners against explicit second moments, and applied exactly once wherever they are used."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from bergson import Attributor, BergsonError, build
from bergson.config import DataConfig, PreconditionerConfig, ReduceConfig, ScoreConfig, options_of
from bergson.preconditioning import fit_preconditioner
from bergson.reduction import reduce
from bergson.scoring import score
from bergson.transforms.preconditioners import (
    TENSORS_FILE,
    Preconditioner,
    is_complete,
    load_preconditioner,
    mix_preconditioners,
    mixing_weight,
    part_file,
    shard_owners,
    sharded_identity,
)
from tests.helpers.gradients import explicit_moments, unit
from tests.helpers.stores import make_cfg as _make_cfg


def make_cfg(tmp, model_dir, corpus_file, name="index", **kw):
    """Short documents (48 tokens) keep each pass over the 24 documents quick."""
    data = kw.pop("data", None) or DataConfig(dataset=str(corpus_file), truncation=True, max_length=48)
    return _make_cfg(tmp, model_dir, corpus_file, name=name, data=data, **kw)


def power(moment: np.ndarray, p: float, damping: float = 0.1) -> np.ndarray:
    lam, q = np.linalg.eigh(moment)
    lam = np.clip(lam, 0, None)
    return (q * (lam + damping * lam.mean()) ** p) @ q.T


def apply_blocks(v: np.ndarray, store, moments, p: float) -> np.ndarray:
    out = np.empty_like(v)
    for m in store.manifest.modules:
        sl = slice(m.offset, m.offset + m.dim)
        out[:, sl] = v[:, sl] @ power(moments[m.name], p)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, model_dir, corpus_file):
    tmp = tmp_path_factory.mktemp("pre")
    train = build(make_cfg(tmp, model_dir, corpus_file, name="train", save_dtype="float32"))
    qdata = DataConfig(dataset=str(corpus_file), split="train[3:6]", truncation=True, max_length=48)
    query = build(make_cfg(tmp, model_dir, corpus_file, name="query", save_dtype="float32", data=qdata))
    pre_cfg = PreconditionerConfig(run_path=str(tmp / "pre"), index=str(train.root))
    pre = fit_preconditioner(pre_cfg)
    moments = explicit_moments(train)
    t, q = np.asarray(train.all, np.float64), np.asarray(query.all, np.float64)
    return {
        "tmp": tmp,
        "train": train,
        "query": query,
        "pre": pre,
        "pre_path": str(tmp / "pre"),
        "qdata": qdata,
        "moments": moments,
        "dot": apply_blocks(t, train, moments, -1.0) @ q.T,
        "cos": unit(apply_blocks(t, train, moments, -0.5)) @ unit(apply_blocks(q, train, moments, -0.5)).T,
    }


def test_second_moment_equals_explicit_one(setup):
    pre: Preconditioner = setup["pre"]
    assert pre.num_rows == 24
    for name, m in setup["moments"].items():
        np.testing.assert_allclose(
            pre.second_moments[name].numpy(), m, rtol=1e-5, atol=1e-7 * np.abs(m).max()
        )


def test_fit_on_data_equals_fit_on_store_and_samples_reproducibly(setup, model_dir, corpus_file):
    tmp = setup["tmp"]
    base = make_cfg(tmp, model_dir, corpus_file, name="pre_data")
    live = fit_preconditioner(options_of(PreconditionerConfig, base))
    for name, m in setup["moments"].items():
        np.testing.assert_allclose(
            live.second_moments[name].numpy(), m, rtol=1e-4, atol=1e-6 * np.abs(m).max()
        )
    sampled = fit_preconditioner(
        options_of(PreconditionerConfig, base, run_path=str(tmp / "pre_sample"), max_documents=10)
    )
    rows = np.sort(np.random.default_rng(0).choice(24, 10, replace=False))
    v = np.asarray(setup["train"].all, np.float64)[rows]
    m0 = setup["train"].manifest.modules[0]
    block = v[:, m0.offset : m0.offset + m0.dim]
    np.testing.assert_allclose(
        sampled.second_moments[m0.name].numpy(), block.T @ block / 10, rtol=1e-4, atol=1e-8
    )


def test_sharded_part_files_load_as_the_whole(setup):
    """A sharded fit's layout (--shard_preconditioners): one part file per rank and a JSON naming
    them load back as the unsharded preconditioner, with the same hash; ``modules`` reads a
    rank's share alone."""
    pre: Preconditioner = setup["pre"]
    dims = {m["name"]: m["dim"] for m in pre.layout["modules"]}
    owners = shard_owners(dims, 2)
    # largest blocks first, each to the lighter rank: the two ranks' loads differ by at most the
    # largest block, and every module has exactly one owner
    loads = [sum(d * d for n, d in dims.items() if owners[n] == r) for r in (0, 1)]
    assert set(owners) == set(dims) and abs(loads[0] - loads[1]) <= max(dims.values()) ** 2
    assert shard_owners(dims, 1) == dict.fromkeys(dims, 0)
    root = setup["tmp"] / "sharded"
    shards = {}
    for r in (0, 1):
        names = [n for n in dims if owners[n] == r]
        part = Preconditioner(
            {n: pre.second_moments[n] for n in names},
            pre.num_rows,
            pre.layout,
            pre.damping,
            pre.damping_mode,
        )
        part.save_tensors(root / part_file(r, 2))
        shards[part_file(r, 2)] = names
    assert not is_complete(root)  # no JSON yet
    pre.save_meta(root, sharded_identity(root, shards, pre), list(dims), shards)
    assert is_complete(root) and not (root / TENSORS_FILE).exists()
    whole = load_preconditioner(root)
    assert whole.modules == pre.modules and whole.identity() == pre.identity()
    for n in dims:
        torch.testing.assert_close(whole.eigenvectors[n], pre.eigenvectors[n], rtol=0, atol=0)
    mine = load_preconditioner(root, modules=shards[part_file(1, 2)])
    assert mine.modules == shards[part_file(1, 2)]
    (root / part_file(1, 2)).unlink()
    assert not is_complete(root)
    with pytest.raises(BergsonError, match="part files"):
        load_preconditioner(root)


def test_matrix_powers_and_damping(setup):
    pre: Preconditioner = setup["pre"]
    name = pre.modules[0]
    h = pre.second_moments[name].double()
    half = pre.matrix(name, -0.5)
    inv = pre.matrix(name, -1.0)
    torch.testing.assert_close(half @ half, inv, rtol=1e-8, atol=1e-10 * float(inv.abs().max()))
    delta = 0.1 * float(pre.eigenvalues[name].mean())
    assert pre.delta(name) == pytest.approx(delta)
    eye = torch.eye(len(h), dtype=torch.float64)
    torch.testing.assert_close(inv @ (h + delta * eye), eye, rtol=0, atol=1e-6)
    absolute = replace(pre, damping=0.5, damping_mode="absolute")
    torch.testing.assert_close(absolute.matrix(name, -1.0) @ (h + 0.5 * eye), eye, rtol=0, atol=1e-8)
    with pytest.raises(BergsonError, match="damping_mode"):
        replace(pre, damping_mode="bogus")


def test_mixing_weight_follows_its_definition():
    g = torch.Generator().manual_seed(0)
    a, b = (
        torch.randn(40, 8, generator=g, dtype=torch.float64),
        torch.randn(5, 8, generator=g, dtype=torch.float64),
    )
    b[:, 0] *= 30  # a strong query direction
    layout = {"model": {"name": "m"}, "projection": {}, "normalizer": None, "modules": []}
    train = Preconditioner({"w": a.T @ a / 40}, 40, layout)
    query = Preconditioner({"w": b.T @ b / 5}, 5, layout)
    mixed = mix_preconditioners(train, query, components=2)
    w = mixed.mixing["weights"]["w"]  # type: ignore[index]
    mu_t = float(torch.linalg.eigvalsh(train.second_moments["w"])[-1])
    mu_q2 = float(torch.linalg.eigvalsh(query.second_moments["w"])[-2])
    assert w * mu_q2 == pytest.approx((1 - w) * mu_t, rel=1e-10)
    torch.testing.assert_close(
        mixed.second_moments["w"], w * query.second_moments["w"] + (1 - w) * train.second_moments["w"]
    )
    # 5 queries span at most 5 directions: more components are clipped to that rank
    assert mixing_weight(train.eigenvalues["w"], query.eigenvalues["w"], 50)[1] == 5
    with pytest.raises(BergsonError, match="downweight_components"):
        mixing_weight(train.eigenvalues["w"], query.eigenvalues["w"], 0)


def _score(setup, model_dir, corpus_file, name, query, **kw):
    base = make_cfg(setup["tmp"], model_dir, corpus_file, name=name, save_dtype="float32")
    return np.asarray(
        score(ScoreConfig(**{**vars(base), "query_path": str(query), **kw}))["scores"], np.float64
    )


def _close(got, expected):
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-5 * np.abs(expected).max())


def test_applied_exactly_once_in_score(setup, model_dir, corpus_file):
    tmp, p = setup["tmp"], setup["pre_path"]
    # a query store that already carries H^-1/2, and a training store that carries it too
    q_pre = build(
        make_cfg(
            tmp,
            model_dir,
            corpus_file,
            name="q_pre",
            save_dtype="float32",
            data=setup["qdata"],
            preconditioner_path=p,
        )
    )
    t_pre = build(
        make_cfg(tmp, model_dir, corpus_file, name="t_pre", save_dtype="float32", preconditioner_path=p)
    )
    assert q_pre.manifest.preconditioner["power"] == -0.5  # type: ignore[index]
    raw_q, raw_t = setup["query"].root, str(setup["train"].root)
    dot, cos = setup["dot"], setup["cos"]
    # one pass over the dataset each
    _close(_score(setup, model_dir, corpus_file, "s1", raw_q, preconditioner_path=p), dot)
    _close(_score(setup, model_dir, corpus_file, "s2", q_pre.root), dot)  # carried by the query store
    _close(
        _score(setup, model_dir, corpus_file, "c1", raw_q, preconditioner_path=p, unit_normalize=True), cos
    )
    # from stored training vectors, with H^-1/2 carried by neither, one or both sides
    cases = [
        ("s3", q_pre.root, {"preconditioner_path": p, "index": raw_t}, dot),
        ("s4", raw_q, {"preconditioner_path": p, "index": raw_t}, dot),
        ("s5", raw_q, {"index": str(t_pre.root)}, dot),
        ("s6", q_pre.root, {"index": str(t_pre.root)}, dot),
        ("c2", q_pre.root, {"unit_normalize": True, "index": raw_t}, cos),
        ("c3", raw_q, {"unit_normalize": True, "index": str(t_pre.root)}, cos),
        ("c4", raw_q, {"preconditioner_path": p, "unit_normalize": True, "index": raw_t}, cos),
        ("c5", q_pre.root, {"unit_normalize": True, "index": str(t_pre.root)}, cos),
    ]
    for name, query, kw, expected in cases:
        _close(_score(setup, model_dir, corpus_file, name, query, **kw), expected)


def test_reduce_carries_half_and_scores_use_the_rest(setup, model_dir, corpus_file):
    tmp, p, train = setup["tmp"], setup["pre_path"], setup["train"]
    base = make_cfg(tmp, model_dir, corpus_file, name="red")
    red = reduce(
        ReduceConfig(
            **{
                **vars(base),
                "index": str(setup["query"].root),
                "preconditioner_path": p,
                "aggregation": "mean",
            }
        )
    )
    q = np.asarray(setup["query"].all, np.float64)
    expected_row = apply_blocks(q.mean(0, keepdims=True), train, setup["moments"], -0.5)
    np.testing.assert_allclose(
        np.asarray(red.all, np.float64), expected_row, rtol=1e-3, atol=1e-4 * np.abs(expected_row).max()
    )
    got = _score(setup, model_dir, corpus_file, "s_red", red.root, index=str(train.root))
    _close(got[:, 0], setup["dot"].mean(1))


def test_attributor_applies_the_preconditioner(setup, model_dir, corpus_file):
    p, train = setup["pre_path"], setup["train"]
    q = np.asarray(setup["query"].all, np.float32)
    attr = Attributor(train.root, preconditioner_path=p)
    scores, idx = attr.search(q, 5)
    expected = np.take_along_axis(setup["dot"].T, idx.numpy(), 1)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-3, atol=1e-5 * np.abs(expected).max())
    assert np.allclose(np.sort(setup["dot"].T, 1)[:, ::-1][:, :5], scores.numpy(), rtol=1e-3)
    with pytest.raises(BergsonError, match="rebuild it with --preconditioner_path"):
        Attributor(train.root, preconditioner_path=p, unit_norm=True)
    t_pre = build(
        make_cfg(
            setup["tmp"],
            model_dir,
            corpus_file,
            name="t_pre_attr",
            save_dtype="float32",
            preconditioner_path=p,
        )
    )
    scores, idx = Attributor(t_pre.root, unit_norm=True).search(q, 3)
    expected = np.take_along_axis(setup["cos"].T, idx.numpy(), 1)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-3, atol=1e-4)


def test_mismatched_preconditioners_are_errors(setup, model_dir, corpus_file):
    tmp, p = setup["tmp"], setup["pre_path"]
    other = str(tmp / "pre_other")
    fit_preconditioner(PreconditionerConfig(run_path=other, index=str(setup["train"].root), damping=0.5))
    q_pre = build(
        make_cfg(
            tmp,
            model_dir,
            corpus_file,
            name="q_pre2",
            save_dtype="float32",
            data=setup["qdata"],
            preconditioner_path=p,
        )
    )
    with pytest.raises(BergsonError, match="different preconditioner"):
        _score(setup, model_dir, corpus_file, "bad1", q_pre.root, preconditioner_path=other)
    wide = build(make_cfg(tmp, model_dir, corpus_file, name="wide", projection_dim=2, save_dtype="float32"))
    with pytest.raises(BergsonError, match="projection"):
        Attributor(wide.root, preconditioner_path=p)
    with pytest.raises(BergsonError, match="not a complete preconditioner"):
        Attributor(setup["train"].root, preconditioner_path=str(tmp))
    # refitting with other options into the same directory needs --overwrite
    with pytest.raises(BergsonError, match="--overwrite"):
        fit_preconditioner(PreconditionerConfig(run_path=p, index=str(setup["train"].root), damping=0.3))
    assert load_preconditioner(p).damping == 0.1
