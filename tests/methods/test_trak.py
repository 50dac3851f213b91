"""TRAK over an ensemble: the formula against a direct numpy computation from the store rows, the
ensemble mean, reuse of built stores, refusal of a store of another model or projection, per-token
scores against a dense computation from the token rows, and TRAK on logistic regression against its
definition from exact per-example gradients."""

from __future__ import annotations

import numpy as np
import pytest

from bergson import BergsonError, ReportConfig, build, trak, trak_scores
from bergson.config import DataConfig, IndexConfig, TrakConfig
from bergson.methods.trak import trak_directions
from bergson.reports.build import build_page
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
    out = run(
        "trak", str(tmp_path / "cli"), "--models", str(model_dir), str(second_model), *args, "--per_token"
    )
    assert "wrote" in out.stdout
    s = load_gradients(tmp_path / "cli" / "scores")
    assert len(s) == 6 and s.manifest.score is not None
    assert s.manifest.score["method"] == "trak" and s.manifest.score["ensemble_size"] == 2
    assert s.has_tokens and load_gradients(tmp_path / "cli" / "model_1" / "train").manifest.dtype == "float32"
    for n in range(6):
        np.testing.assert_allclose(
            np.asarray(s.token_rows(n), np.float64).sum(0),
            np.asarray(s["scores"][n], np.float64),
            rtol=1e-4,
            atol=1e-6,
        )
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


# ---------------------------------------------------------------- per-token scores


@pytest.fixture(scope="module")
def token_run(tmp_path_factory, model_dir, second_model, corpus_file):
    root = tmp_path_factory.mktemp("trak_tokens") / "run"
    scores = trak(_cfg(root, corpus_file, [model_dir, second_model], per_token=True))
    return root, scores


def _token_rows(store) -> list[np.ndarray]:
    order = np.argsort(np.asarray(store.rows["row_id"]))
    return [np.asarray(store.token_rows(int(i)), np.float64) for i in order]


def test_per_token_scores_split_the_document_scores(token_run, ensemble_run):
    """Each model's token rows are q_n φ_{n,t}ᵀ (ΦᵀΦ + λI)⁻¹ φ_q from the training store's token
    rows (a dense inverse), sum to the document scores, and the ensemble's are their mean; the
    document scores are those of a run without --per_token."""
    root, scores = token_run
    per_model = []
    for i in range(2):
        train = load_gradients(root / f"model_{i}" / "train")
        assert train.has_tokens and not load_gradients(root / f"model_{i}" / "query").has_tokens
        phi, losses, lengths = _rows(root / f"model_{i}" / "train")
        phi_q, _, _ = _rows(root / f"model_{i}" / "query")
        q = 1 - np.exp(-losses / (lengths - 1))  # no masks: every token after the first is a loss token
        k = phi.shape[1]
        assert k > len(phi)  # fewer documents than columns: the shares come from the Woodbury form
        inv = np.linalg.inv(phi.T @ phi + 0.05 * np.trace(phi.T @ phi) / k * np.eye(k))
        mine = load_gradients(root / f"model_{i}" / "scores")
        doc = np.asarray(mine["scores"], np.float64)
        scale = np.abs(doc).max()
        np.testing.assert_allclose(doc, q[:, None] * (phi @ inv @ phi_q.T), rtol=2e-5, atol=1e-6 * scale)
        assert mine.has_tokens and len(mine) == 12
        for n, rows in enumerate(_token_rows(train)):
            got = np.asarray(mine.token_rows(n), np.float64)
            assert got.shape == (len(rows), phi_q.shape[0]) and len(rows) == lengths[n] > 1
            np.testing.assert_allclose(got, q[n] * (rows @ inv @ phi_q.T), rtol=1e-4, atol=1e-6 * scale)
            # the shares add up to the document's score (the stores are float32 per token)
            np.testing.assert_allclose(got.sum(0), doc[n], rtol=0, atol=1e-5 * scale)
        per_model.append(mine)
    _, plain = ensemble_run  # the same scores as without --per_token (whose stores are float16)
    expected = np.asarray(plain["scores"], np.float64)
    np.testing.assert_allclose(
        np.asarray(scores["scores"]), expected, rtol=0, atol=3e-3 * np.abs(expected).max()
    )
    assert (
        scores.has_tokens
        and scores.manifest.score is not None
        and scores.manifest.score["ensemble_size"] == 2
    )
    for n in range(12):
        mean = (
            np.asarray(per_model[0].token_rows(n), np.float64) + np.asarray(per_model[1].token_rows(n))
        ) / 2
        np.testing.assert_allclose(np.asarray(scores.token_rows(n)), mean, rtol=1e-6, atol=1e-9)

    # `bergson report` reads the ensemble's store and shows its token shares
    page = build_page(ReportConfig(source=str(root / "scores"), top_k=3))
    shown = 0
    for c, entry in enumerate(page["queries"]):
        for h in entry["proponents"] + entry["opponents"]:
            tokens = np.asarray(scores.token_rows(h["row"]))[:, c]
            np.testing.assert_allclose(h["token_scores"], tokens, rtol=1e-3, atol=1e-9)
            assert len(page["docs"][str(h["row"])]["tokens"]) == scores.rows["num_tokens"][h["row"]]
            shown += 1
    assert shown > 0


def test_token_directions_wide_and_narrow():
    """(ΦᵀΦ + λI)⁻¹ Φ_qᵀ by the k x k solve (N >= k) and by Woodbury's N x N one (N < k) equal the
    dense inverse; with N < k and no damping the shares are undefined and refused."""
    rng = np.random.default_rng(1)
    for n, k in ((30, 8), (6, 40)):
        phi, phi_q = rng.normal(size=(n, k)), rng.normal(size=(3, k))
        lam = 0.3
        dense = np.linalg.inv(phi.T @ phi + lam * np.eye(k)) @ phi_q.T
        got = trak_directions(phi, phi_q, lam, "absolute")
        np.testing.assert_allclose(got, dense, rtol=1e-8, atol=1e-10 * np.abs(dense).max())
        # the tokens' shares of a row sum to its document score
        parts = rng.normal(size=(n, 4, k))
        rows = parts.sum(1)
        q = rng.uniform(size=n)
        doc = trak_scores(rows, phi_q, q, lam, "absolute")
        shares = q[:, None, None] * (parts @ trak_directions(rows, phi_q, lam, "absolute"))
        np.testing.assert_allclose(shares.sum(1), doc, rtol=1e-8, atol=1e-10 * np.abs(doc).max())
    with pytest.raises(BergsonError, match=r"--damping 0\.0 with --per_token"):
        trak_directions(rng.normal(size=(4, 9)), rng.normal(size=(2, 9)), 0.0, "absolute")


def test_per_token_stores(token_run, ensemble_run, tmp_path, model_dir, corpus_file):
    """--per_token with --stores: a (float32) store with token rows gives the run's own token
    scores; one without them is refused by name."""
    root, _ = token_run
    built = tmp_path / "built"
    build(
        IndexConfig(
            run_path=str(built),
            model=str(model_dir),
            precision="fp32",
            data=_data(corpus_file),
            token_batch_size=512,
            projection_dim=2,
            per_token=True,
            save_dtype="float32",
        )
    )
    again = trak(_cfg(tmp_path / "reuse", corpus_file, [model_dir], stores=[str(built)], per_token=True))
    mine = load_gradients(root / "model_0" / "scores")
    np.testing.assert_allclose(np.asarray(again["scores"]), np.asarray(mine["scores"]), rtol=1e-5, atol=1e-7)
    scale = np.abs(np.asarray(mine["scores"])).max()
    for n in range(len(mine)):
        np.testing.assert_allclose(
            np.asarray(again.token_rows(n)), np.asarray(mine.token_rows(n)), rtol=1e-5, atol=1e-6 * scale
        )
    plain = ensemble_run[0] / "model_0" / "train"
    with pytest.raises(BergsonError, match=r"--stores .*model_0/train: it has no token rows.*--per_token"):
        trak(_cfg(tmp_path / "refused", corpus_file, [model_dir], stores=[str(plain)], per_token=True))


# ---------------------------------------------------------------- logistic regression


def test_logistic_regression_equals_the_dense_definition():
    """TRAK of a trained multinomial logistic regression (one linear layer, the digits workload of
    ``benchmarks.peers``): bergson's per-example margin gradients and ``trak_scores`` against the
    definition written out densely, diag(1 - p) Φ (ΦᵀΦ + λI)⁻¹ Φ_qᵀ with the closed-form gradient of
    the margin log p_y - log(1 - p_y), which is ((e_y - p) / (1 - p_y)) [x, 1]ᵀ; and the peers
    benchmark's own TRAK row, which uses ΦᵀΦ / N, is the same matrix times N."""
    import torch

    from benchmarks.peers import digits

    data = digits.make_data(40, 6, seed=0)
    model = digits.train(data["x_train"], data["y_train"], wd=0.1)
    weight = model.fc.weight.detach().double().numpy()
    bias = model.fc.bias.detach().double().numpy()

    def closed_form(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z = x.astype(np.float64) @ weight.T + bias
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p_y = p[np.arange(len(y)), y]
        dz = (np.eye(weight.shape[0])[y] - p) / (1 - p_y)[:, None]
        # weight row-major, then the bias (bergson's layout with include_bias)
        return np.concatenate([np.einsum("no,ni->noi", dz, x).reshape(len(x), -1), dz], 1), p_y

    phi, p_train = closed_form(data["x_train"], data["y_train"])
    phi_q, _ = closed_form(data["x_query"], data["y_query"])
    n, k = phi.shape
    assert (n, k) == (40, 650)  # fewer examples than columns: the push-through solve
    lam = 1e-3 * np.trace(phi.T @ phi) / k
    dense = (1 - p_train)[:, None] * (phi @ np.linalg.inv(phi.T @ phi + lam * np.eye(k)) @ phi_q.T)

    got_phi = digits._per_example(model, data["x_train"], data["y_train"], "margin").numpy()
    got_q = digits._per_example(model, data["x_query"], data["y_query"], "margin").numpy()
    np.testing.assert_allclose(got_phi, phi, rtol=1e-4, atol=1e-5 * np.abs(phi).max())
    with torch.no_grad():
        p = torch.softmax(model(torch.from_numpy(data["x_train"])), -1).double().numpy()
    weights = 1 - p[np.arange(n), data["y_train"]]
    scores = trak_scores(got_phi, got_q, weights, 1e-3, "relative")
    scale = np.abs(dense).max()
    assert scale > 0 and np.abs(dense).min() < 1e-2 * scale  # a spread of values, not a constant
    np.testing.assert_allclose(scores, dense, rtol=0, atol=1e-5 * scale)  # float32 gradients
    # the benchmark's peer row ([queries, train], with ΦᵀΦ / N and δ relative to its eigenvalues)
    peer = digits.ours(model, data, 0.1, "trak").T
    np.testing.assert_allclose(peer / n, scores, rtol=0, atol=1e-9 * scale)


def test_ensemble_token_rows_need_the_same_tokens(token_run, tmp_path):
    """Models that split a document into different numbers of tokens cannot average their token
    scores: refused, naming the models and the document."""
    from bergson.methods.trak import _mean_token_rows
    from bergson.store.scores import save_score_matrix

    root, _ = token_run
    base = load_gradients(root / "model_0" / "scores").manifest
    scores = np.ones((2, 1))
    a = save_score_matrix(tmp_path / "a", scores, base, {}, False, tokens=[np.ones((3, 1)), np.ones((2, 1))])
    b = save_score_matrix(tmp_path / "b", scores, base, {}, False, tokens=[np.ones((3, 1)), np.ones((4, 1))])
    c = save_score_matrix(
        tmp_path / "c", scores, base, {}, False, tokens=[np.zeros((3, 1)), np.zeros((2, 1))]
    )
    mean = _mean_token_rows([a, c], ["m0", "m1"])
    assert [len(t) for t in mean] == [3, 2] and all(np.allclose(t, 0.5) for t in mean)
    with pytest.raises(
        BergsonError, match="--per_token: models m0 and m1 split document 1 into 2 and 4 tokens"
    ):
        _mean_token_rows([a, b], ["m0", "m1"])
