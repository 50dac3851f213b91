"""TRAK over an ensemble: the formula against a direct numpy computation from the store rows, the
ensemble mean, reuse of built stores, and refusal of a store of another model or projection."""

from __future__ import annotations

import numpy as np
import pytest

from bergson import BergsonError, build, trak, trak_scores
from bergson.config import DataConfig, IndexConfig, TrakConfig
from bergson.store import load_gradients
from tests.helpers.assets import ASSETS
from tests.helpers.cli import run

QUERIES = DataConfig(
    dataset=str(ASSETS / "queries.jsonl"),
    prompt_column="prompt",
    completion_column="completion",
    truncation=True,
)


@pytest.fixture(scope="module")
def second_model(tmp_path_factory):
    from benchmarks.common import random_neox_dir

    out = tmp_path_factory.mktemp("model_b")
    return random_neox_dir(out, hidden=32, layers=2, heads=2, intermediate=64, max_positions=512, seed=1)


def _data(corpus_file) -> DataConfig:
    return DataConfig(dataset=str(corpus_file), truncation=True, max_length=48, split="train[:12]")


def _cfg(path, corpus_file, models, **kw) -> TrakConfig:
    options = dict(precision="fp32", token_batch_size=512, projection_dim=2, damping=0.05)
    return TrakConfig(
        run_path=str(path),
        models=[str(m) for m in models],
        data=_data(corpus_file),
        query=QUERIES,
        **{**options, **kw},
    )


def _rows(path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    store = load_gradients(path)
    order = np.argsort(np.asarray(store.rows["row_id"]))
    return (
        np.asarray(store.all, np.float64)[order],
        np.asarray(store.rows["loss"], np.float64)[order],
        np.asarray(store.rows["num_tokens"])[order],
    )


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory, model_dir, second_model, corpus_file):
    root = tmp_path_factory.mktemp("trak") / "run"
    scores = trak(_cfg(root, corpus_file, [model_dir, second_model]))
    return root, scores


def test_one_model_equals_numpy_formula(ensemble_run, corpus_file):
    root, _ = ensemble_run
    phi, losses, _ = _rows(root / "model_0" / "train")
    phi_q, _, _ = _rows(root / "model_0" / "query")
    # Q from the documents' loss tokens (the data has no masks: every token after the first)
    from bergson.data import load_data, tokenize_documents
    from bergson.models import load_model

    cfg = _cfg(root, corpus_file, [])
    _, tok = load_model(
        IndexConfig(model=str(load_gradients(root / "model_0" / "train").manifest.model["name"]))
    )
    docs = tokenize_documents(load_data(cfg.data), tok, cfg.data, 512)
    q = 1 - np.exp(-losses / docs.num_loss_tokens())
    k = phi.shape[1]
    lam = 0.05 * np.trace(phi.T @ phi) / k
    expected = (q[:, None] * phi) @ np.linalg.inv(phi.T @ phi + lam * np.eye(k)) @ phi_q.T
    got = np.asarray(load_gradients(root / "model_0" / "scores")["scores"], np.float64)
    assert phi.shape[0] == 12 and phi_q.shape[0] >= 2
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-6 * np.abs(expected).max())


def test_wide_and_narrow_solves_agree():
    rng = np.random.default_rng(0)
    for n, k in ((30, 8), (8, 30)):
        phi, phi_q, q = rng.normal(size=(n, k)), rng.normal(size=(3, k)), rng.uniform(size=n)
        lam = 0.3
        dense = q[:, None] * (phi @ np.linalg.inv(phi.T @ phi + lam * np.eye(k)) @ phi_q.T)
        np.testing.assert_allclose(trak_scores(phi, phi_q, q, lam, "absolute"), dense, rtol=1e-9, atol=1e-12)


def test_ensemble_is_mean_of_models(ensemble_run):
    root, scores = ensemble_run
    per = [np.asarray(load_gradients(root / f"model_{i}" / "scores")["scores"], np.float64) for i in range(2)]
    assert not np.allclose(per[0], per[1])  # the two models really differ
    np.testing.assert_allclose(np.asarray(scores["scores"], np.float64), (per[0] + per[1]) / 2, rtol=1e-6)
    assert scores.manifest.score is not None and scores.manifest.score["ensemble_size"] == 2


def test_reused_stores_give_same_scores(ensemble_run, tmp_path, model_dir, second_model, corpus_file):
    _, scores = ensemble_run
    built = []
    for i, m in enumerate((model_dir, second_model)):
        path = tmp_path / f"built_{i}"
        build(
            IndexConfig(
                run_path=str(path),
                model=str(m),
                precision="fp32",
                data=_data(corpus_file),
                token_batch_size=512,
                projection_dim=2,
            )
        )
        built.append(str(path))
    again = trak(_cfg(tmp_path / "reuse", corpus_file, [model_dir, second_model], stores=built))
    assert not (tmp_path / "reuse" / "model_0" / "train").exists()
    np.testing.assert_allclose(
        np.asarray(again["scores"]), np.asarray(scores["scores"]), rtol=1e-5, atol=1e-7
    )

    # a store of the other model, or of another projection, is refused by name
    with pytest.raises(BergsonError, match=r"--stores .*built_1.*model\.name"):
        trak(_cfg(tmp_path / "swapped", corpus_file, [model_dir, second_model], stores=built[::-1]))
    with pytest.raises(BergsonError, match=r"--stores .*built_0.*projection"):
        trak(_cfg(tmp_path / "wide", corpus_file, [model_dir], stores=built[:1], projection_dim=3))
    short = _cfg(tmp_path / "short", corpus_file, [model_dir], stores=built[:1])
    short.data.max_length = 40  # the same rows, tokenized otherwise
    with pytest.raises(BergsonError, match=r"--stores .*built_0: built on other documents"):
        trak(short)
    with pytest.raises(BergsonError, match="1 stores for 2 models"):
        trak(_cfg(tmp_path / "few", corpus_file, [model_dir, second_model], stores=built[:1]))


def test_cli(tmp_path, model_dir, second_model, corpus_file):
    args = [
        "--dataset", str(corpus_file), "--split", "train[:6]", "--truncation", "--max_length", "32",
        "--query.dataset", str(ASSETS / "queries.jsonl"), "--query.prompt_column", "prompt",
        "--query.completion_column", "completion", "--query.truncation",
        "--projection_dim", "2", "--precision", "fp32",
    ]  # fmt: skip
    out = run("trak", str(tmp_path / "cli"), "--models", str(model_dir), str(second_model), *args)
    assert "wrote" in out.stdout
    s = load_gradients(tmp_path / "cli" / "scores")
    assert len(s) == 6 and s.manifest.score is not None
    assert s.manifest.score["method"] == "trak" and s.manifest.score["ensemble_size"] == 2
    bad = run(
        "trak",
        str(tmp_path / "bad"),
        "--model",
        str(model_dir),
        "--models",
        str(model_dir),
        *args,
        check=False,
    )
    assert bad.returncode == 1 and "--model and --models" in bad.stderr and "Traceback" not in bad.stderr


def test_resume_after_a_lost_step(ensemble_run, corpus_file, model_dir, second_model):
    import shutil

    root, scores = ensemble_run
    before = np.asarray(scores["scores"]).copy()
    train_manifest = (root / "model_1" / "train" / "manifest.json").stat().st_mtime_ns
    shutil.rmtree(root / "scores")
    shutil.rmtree(root / "model_1" / "scores")
    again = trak(_cfg(root, corpus_file, [model_dir, second_model]))
    assert (root / "model_1" / "train" / "manifest.json").stat().st_mtime_ns == train_manifest  # not rebuilt
    np.testing.assert_array_equal(np.asarray(again["scores"]), before)
