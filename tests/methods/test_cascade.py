"""The retrieve-then-rescore cascade against the full methods: its rescored rows equal the full
method's scores on those rows, k = all rows equals the full method, the candidates are a numpy
top-k of the earlier store, and bad input is refused."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from bergson import BergsonError, EkfacConfig, TrackstarConfig, ekfac, trackstar
from bergson.cli import main
from bergson.config import DataConfig
from bergson.methods.cascade import UNSCORED, cascade, cascade_config, select_candidates
from bergson.querying import write_hits
from bergson.store import load_gradients
from bergson.store.scores import save_score_matrix
from tests.helpers.option_reads import recording

N = 8


def _common(model_dir, corpus_file) -> dict:
    return dict(
        model=str(model_dir),
        precision="fp32",
        data=DataConfig(dataset=str(corpus_file), split=f"train[:{N}]", truncation=True, max_length=16),
        query=DataConfig(dataset=str(corpus_file), split="train[20:23]", truncation=True, max_length=16),
        token_batch_size=64,
        modules=["gpt_neox.layers.1.mlp.*"],
    )


@pytest.fixture(scope="module")
def full(tmp_path_factory, model_dir, corpus_file):
    """The full TrackStar run, a cheap first-stage scores store of the same rows, a cascade (k = 2)
    that fits EK-FAC from scratch, and the full EK-FAC run on the cascade's curvature and queries."""
    root = tmp_path_factory.mktemp("cascade")
    common = _common(model_dir, corpus_file)
    ts = trackstar(
        TrackstarConfig(
            run_path=str(root / "trackstar"),
            projection_dim=4,
            stats_documents=6,
            downweight_components=2,
            **common,
        )
    )
    cheap = np.random.default_rng(0).normal(size=(N, 3))
    cheap[5] = cheap[2]  # ties: the lower row first, as top_rows
    store = save_score_matrix(root / "cheap", cheap, ts.manifest, {"kind": "test"}, overwrite=True)
    cfg = cascade_config(
        "ekfac", run_path=str(root / "cascade"), candidates=str(store.root), top_k=2, **common
    )
    with recording([type(cfg)]) as reads:
        cascaded = cascade(cfg)
    _reuse({"root": root}, "cascade", root / "ekfac", ("covariances", "eigen", "corrected", "queries"))
    ek = ekfac(EkfacConfig(run_path=str(root / "ekfac"), **common))  # the scoring pass over every row
    out = {"root": root, "common": common, "ekfac": ek, "trackstar": ts, "cheap": store}
    return {**out, "cascade": cascaded, "reads": reads}


def _numpy_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    return np.unique(
        np.concatenate([np.argsort(-scores[:, c], kind="stable")[:k] for c in range(scores.shape[1])])
    )


def _reuse(full, name: str, target, stages) -> None:
    for stage in stages:
        shutil.copytree(full["root"] / name / stage, target / stage)


def test_rescored_rows_equal_full_ekfac_with_factors_fitted_on_the_whole_corpus(full):
    """The cascade fitted its curvature on all N rows (not the candidates), rescored exactly the
    numpy top-k union, and its scores equal the full run's on those rows; the others are marked."""
    import json

    for stage in ("covariances", "corrected"):
        assert json.loads((full["root"] / "cascade" / stage / "factors.json").read_text())["documents"] == N
    assert {("CascadeEkfacConfig", name) for name in ("candidates", "top_k", "method")} <= full["reads"]
    out = full["cascade"]
    rows = _numpy_top_k(np.asarray(full["cheap"]["scores"], np.float64), 2)
    assert 2 < len(rows) < N
    done = out.manifest.score["cascade"]
    assert (
        done["rescored_row_ids"] == rows.tolist() and done["rescored_rows"] == len(rows) and done["rows"] == N
    )
    assert done["method"] == "ekfac" and done["top_k"] == 2 and done["candidates"] == str(full["cheap"].root)
    assert done["made_by"]["kind"] == "test" and done["unscored_value"] == UNSCORED
    s, f = np.asarray(out["scores"], np.float64), np.asarray(full["ekfac"]["scores"], np.float64)
    np.testing.assert_allclose(s[rows], f[rows], rtol=1e-6, atol=1e-6)
    others = np.setdiff1d(np.arange(N), rows)
    assert (s[others] == np.float32(UNSCORED)).all()


def test_all_rows_equal_full_ekfac_and_astra_and_the_cli_says_how_many(full, tmp_path, capsys):
    root = tmp_path / "all"
    root.mkdir()
    _reuse(
        full, "ekfac", root, ("covariances", "eigen", "corrected", "queries")
    )  # only the scoring pass runs
    a = cascade(
        cascade_config(
            "ekfac", run_path=str(root), candidates=str(full["cheap"].root), top_k=N, **full["common"]
        )
    )
    np.testing.assert_allclose(
        np.asarray(a["scores"]), np.asarray(full["ekfac"]["scores"]), rtol=1e-6, atol=1e-6
    )
    d = full["common"]["data"]
    q = full["common"]["query"]
    (tmp_path / "cli").mkdir()
    _reuse(full, "ekfac", tmp_path / "cli", ("covariances", "eigen", "corrected"))  # ASTRA solves the queries
    main([
        "score", str(tmp_path / "cli"), "--candidates", str(full["ekfac"].root), "--top_k", "3", "--method", "ekfac",
        "--ihvp", "astra", "--ihvp_steps", "1", "--model", full["common"]["model"], "--precision", "fp32",
        "--dataset", d.dataset, "--split", d.split, "--truncation", "--max_length", "16", "--query.dataset",
        q.dataset, "--query.split", q.split, "--query.truncation", "--query.max_length", "16",
        "--token_batch_size", "64", "--modules", "gpt_neox.layers.1.mlp.*",
    ])  # fmt: skip
    printed = capsys.readouterr().out
    rows = _numpy_top_k(np.asarray(full["ekfac"]["scores"]), 3)
    assert f"rescored {len(rows)} of {N} rows" in printed and "with ekfac" in printed
    out = load_gradients(tmp_path / "cli" / "scores")
    assert out.manifest.score["cascade"]["ihvp"] == "astra"
    # the full ASTRA run with the same curvature and query products: equal on the rescored rows
    _reuse({"root": tmp_path}, "cli", tmp_path / "astra", ("covariances", "eigen", "corrected", "queries"))
    astra = ekfac(EkfacConfig(run_path=str(tmp_path / "astra"), ihvp="astra", ihvp_steps=1, **full["common"]))
    np.testing.assert_allclose(
        np.asarray(out["scores"])[rows], np.asarray(astra["scores"])[rows], rtol=1e-6, atol=1e-6
    )


def test_trackstar_rescores_query_results_like_the_full_run(full, tmp_path):
    ts = np.asarray(full["trackstar"]["scores"], np.float64)
    hits = [
        {"query": q, "rank": r + 1, "row_id": int(row), "score": float(ts[row, q]), "text": ""}
        for q in range(3)
        for r, row in enumerate(np.argsort(-ts[:, q], kind="stable")[:4])
    ]
    write_hits(str(tmp_path / "hits.jsonl"), hits)
    root = tmp_path / "c"
    root.mkdir()
    _reuse(full, "trackstar", root, ("query", "mixed"))  # the statistics are the full run's
    cfg = cascade_config(
        "trackstar", run_path=str(root), candidates=str(tmp_path / "hits.jsonl"), top_k=2,
        projection_dim=4, stats_documents=6, downweight_components=2, **full["common"],
    )  # fmt: skip
    with recording([type(cfg)]) as reads:
        out = cascade(cfg)
    assert {("CascadeTrackstarConfig", name) for name in ("candidates", "top_k", "method")} <= reads
    rows = _numpy_top_k(ts, 2)
    assert out.manifest.score["cascade"]["rescored_row_ids"] == rows.tolist()
    assert out.manifest.score["cascade"]["source"] == "query results"
    s = np.asarray(out["scores"], np.float64)
    np.testing.assert_allclose(s[rows], ts[rows], rtol=1e-6, atol=1e-6)
    assert (s[np.setdiff1d(np.arange(N), rows)] == np.float32(UNSCORED)).all()
    assert not (root / "scores_candidates").exists()


def test_selection_is_a_numpy_top_k_and_skips_an_earlier_cascades_unscored_rows(tmp_path, full):
    cheap = np.asarray(full["cheap"]["scores"], np.float64)
    for k in (1, 2, 3, N + 5):
        got = select_candidates(full["cheap"].root, k, N, 3)
        assert got.rows.tolist() == _numpy_top_k(cheap, k).tolist()
        assert [p.tolist() for p in got.per_query] == [
            np.argsort(-cheap[:, c], kind="stable")[:k].tolist() for c in range(3)
        ]
    partial = cheap.copy()
    partial[[0, 3]] = UNSCORED
    store = save_score_matrix(tmp_path / "partial", partial, full["cheap"].manifest, {}, overwrite=True)
    assert not {0, 3} & set(select_candidates(store.root, N, N, 3).rows.tolist())


def test_bad_candidates_and_options_are_refused(full, tmp_path, capsys):
    cheap = full["cheap"]
    with pytest.raises(BergsonError, match="--dataset has 9"):
        select_candidates(cheap.root, 2, 9, 3)  # a store of other rows
    with pytest.raises(BergsonError, match="3 score columns for 2 queries"):
        select_candidates(cheap.root, 2, N, 2)
    write_hits(str(tmp_path / "h.jsonl"), [{"query": 0, "rank": 1, "row_id": N, "score": 1.0}])
    with pytest.raises(BergsonError, match=f"row {N} is not a row of --dataset"):
        select_candidates(tmp_path / "h.jsonl", 2, N, 1)
    (tmp_path / "x.txt").write_text("1\n")
    for bad in (tmp_path / "x.txt", tmp_path / "missing", full["root"] / "ekfac" / "eigen"):
        with pytest.raises(BergsonError, match="--candidates"):
            select_candidates(bad, 2, N, 3)
    with pytest.raises(BergsonError, match="--top_k 0"):
        cascade(
            cascade_config(
                "ekfac", run_path=str(tmp_path / "k"), candidates=str(cheap.root), top_k=0, **full["common"]
            )
        )
    with pytest.raises(BergsonError, match="--per_token with --candidates"):
        cascade(
            cascade_config(
                "ekfac",
                run_path=str(tmp_path / "k"),
                candidates=str(cheap.root),
                per_token=True,
                **full["common"],
            )
        )
    with pytest.raises(BergsonError, match="--method magic with --candidates: MAGIC"):
        cascade_config("magic", candidates=str(cheap.root))
    for args, message in (
        (["--method", "magic"], "--method magic with --candidates"),
        (["--method", "dot"], "--method dot with --candidates"),
        (["--top_k", "0"], "--top_k 0: must be >= 1"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(["score", str(tmp_path / "cli"), "--candidates", str(cheap.root), *args])
        assert exit_.value.code == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "k").exists() and not (tmp_path / "cli").exists()
