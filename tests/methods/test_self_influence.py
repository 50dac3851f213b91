"""Self-influence against its definitions: |g|² from naive per-example autograd (dot), the TrackStar
product's diagonal (trackstar), gᵀ (F + δI)⁻¹ g with the EK-FAC Fisher built densely (ekfac); bad input
refused; the report shows a ranked list and a histogram."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bergson import BergsonError, SelfInfluenceConfig, self_influence
from bergson.cli import main
from bergson.config import DataConfig
from bergson.methods.ekfac import (
    DocumentSource,
    EkfacOptions,
    fit_corrected_eigenvalues,
    fit_covariances,
    precondition_queries,
    query_gradients,
    score_documents,
)
from bergson.methods.self_influence import ORIENTATION, ekfac_self_scores
from bergson.models import find_tracked_modules, load_model
from bergson.runs.documents import load_docs
from bergson.transforms.ekfac import Factors, dense_fisher, eigendecompose
from bergson.transforms.projection import projection_matrix
from tests.helpers.assets import tiny_neox
from tests.helpers.gradients import naive_gradients, random_docs

LAYER = "gpt_neox.layers.0.attention.dense"


def _cfg(tmp_path, model_dir, corpus_file, name, **kw) -> SelfInfluenceConfig:
    return SelfInfluenceConfig(
        run_path=str(tmp_path / name),
        model=str(model_dir),
        precision="fp32",
        device="cpu",
        data=kw.pop(
            "data", DataConfig(dataset=str(corpus_file), split="train[:6]", truncation=True, max_length=16)
        ),
        token_batch_size=256,
        modules=[kw.pop("module", LAYER)],
        **kw,
    )


def _naive(cfg: SelfInfluenceConfig) -> tuple[dict, list]:
    """Per module, [N, out, in(+1)] gradients of each document from one backward pass each
    (the bias column last with --include_bias), and the documents' lengths."""
    model, tokenizer = load_model(cfg)
    docs = load_docs(cfg.data, tokenizer, cfg.token_batch_size)
    modules = find_tracked_modules(model, cfg.modules)
    out = {}
    for name, grads in naive_gradients(model, docs, modules, cfg.include_bias).items():
        rows = [torch.cat([w, b[:, None]], 1) if b is not None else w for w, b in grads]
        out[name] = torch.stack(rows).double()
    return out, list(docs.lengths)


def _scores(store) -> np.ndarray:
    return np.asarray(store["scores"], np.float64)[:, 0]


def test_dot_is_the_squared_gradient_norm_exact_or_projected(tmp_path, model_dir, corpus_file):
    cfg = _cfg(tmp_path, model_dir, corpus_file, "dot", projection_dim=0, include_bias=True, per_token=True)
    store = self_influence(cfg)
    grads, lengths = _naive(cfg)
    exact = sum((g**2).sum((1, 2)) for g in grads.values()).numpy()
    np.testing.assert_allclose(_scores(store), exact, rtol=2e-4)
    # token rows: each token's share, summing to the document's score
    for i, n in enumerate(lengths):
        tokens = np.asarray(store.token_rows(i), np.float64)[:, 0]
        assert len(tokens) == n
        assert abs(tokens.sum() - exact[i]) <= 1e-4 * exact[i]
    s = store.manifest.score
    assert s["kind"] == "self_influence" and s["method"] == "dot" and s["projection_dim"] == 0
    assert s["orientation"] == ORIENTATION and store.manifest.preconditioner["kind"] == "none"
    # projected: |L G Rᵀ|² with the build's own matrices, an estimate of |G|² within a few x here
    p = 4
    proj = self_influence(_cfg(tmp_path, model_dir, corpus_file, "dotp", projection_dim=p, include_bias=True))
    ((name, g),) = grads.items()
    left = projection_matrix(0, name, "left", p, g.shape[1], dtype=torch.float64)
    right = projection_matrix(0, name, "right", p, g.shape[2], dtype=torch.float64)
    expected = ((left @ g @ right.T) ** 2).sum((1, 2)).numpy()
    np.testing.assert_allclose(_scores(proj), expected, rtol=2e-4)
    assert proj.manifest.score["projection_dim"] == p
    # `bergson report` shows it as one ranked list (most and least self-influential) and a histogram
    from bergson.config import ReportConfig
    from bergson.reports.build import build_page

    page = build_page(ReportConfig(source=str(store.root), top_k=2, bins=4))
    (q,) = page["queries"]
    order = np.argsort(-exact)
    assert [h["row"] for h in q["proponents"]] == order[:2].tolist()
    assert [h["row"] for h in q["opponents"]] == order[::-1][:2].tolist()
    assert q["sides"]["proponents"] == "Most self-influential" and sum(q["histogram"]["counts"]) == 6
    assert page["orientation"] == ORIENTATION and len(q["proponents"][0]["token_scores"]) == lengths[order[0]]


def test_trackstar_is_the_diagonal_of_the_unnormalized_trackstar_product(
    tmp_path, model_dir, corpus_file, capsys
):
    p, damping = 4, 0.2
    cfg = _cfg(tmp_path, model_dir, corpus_file, "ts", method="trackstar", projection_dim=p, damping=damping)
    args = [cfg.run_path, "--model", cfg.model, "--precision", "fp32", "--device", "cpu", "--dataset",
            cfg.data.dataset, "--split", "train[:6]", "--truncation", "--max_length", "16", "--token_batch_size",
            "256", "--modules", LAYER, "--method", "trackstar", "--projection_dim", "4", "--damping", "0.2",
            "--top_k", "3"]  # fmt: skip
    main(["self_influence", *args])
    out = capsys.readouterr().out
    assert "self-influence (trackstar) 0:" in out and out.count(" row ") == 3
    from bergson import load_gradients

    store = load_gradients(tmp_path / "ts" / "scores")
    grads, _ = _naive(cfg)
    ((name, g),) = grads.items()
    left = projection_matrix(0, name, "left", p, g.shape[1], dtype=torch.float64)
    right = projection_matrix(0, name, "right", p, g.shape[2], dtype=torch.float64)
    v = (left @ g @ right.T).reshape(len(g), -1)
    r = v.T @ v / len(v)  # the training set's second moment (every document has a loss token)
    r = r + damping * float(torch.linalg.eigvalsh(r).clamp(min=0).mean()) * torch.eye(len(r), dtype=r.dtype)
    # TrackStar's product of documents i and j before its unit normalization: v_i R⁻¹ v_jᵀ
    product = v @ torch.linalg.solve(r, v.T)
    np.testing.assert_allclose(_scores(store), torch.diagonal(product).numpy(), rtol=1e-3)
    assert store.manifest.preconditioner["kind"] == "trackstar"
    assert store.manifest.score["preconditioner"].startswith("(R + δI)⁻¹")


def test_ekfac_command_is_the_damped_inverse_ekfac_fisher_norm(tmp_path, model_dir, corpus_file):
    cfg = _cfg(
        tmp_path, model_dir, corpus_file, "ek", method="ekfac", fisher="empirical", factor_dtype="float64"
    )
    store = self_influence(cfg)
    eigen = Factors.load(tmp_path / "ek" / "eigen")
    lam = Factors.load(tmp_path / "ek" / "corrected").tensors[LAYER]["eigenvalues"]
    g = _naive(cfg)[0][LAYER].reshape(6, -1)
    f = dense_fisher(eigen, lam, LAYER) + 0.1 * float(lam.mean()) * torch.eye(g.shape[1], dtype=torch.float64)
    expected = torch.einsum("ni,ni->n", g, torch.linalg.solve(f, g.T).T).numpy()
    np.testing.assert_allclose(_scores(store), expected, rtol=1e-3)
    assert (
        store.manifest.score["method"] == "ekfac" and store.manifest.preconditioner["fisher"] == "empirical"
    )
    # a rerun with the same options finds every stage complete
    stamp = (tmp_path / "ek" / "scores" / "manifest.json").stat().st_mtime_ns
    self_influence(cfg)
    assert (tmp_path / "ek" / "scores" / "manifest.json").stat().st_mtime_ns == stamp


def test_ekfac_self_scores_equal_the_dense_fisher_form_and_the_diagonal_of_ekfac_scores():
    model = tiny_neox(vocab=24, hidden=8, layers=1)
    docs = random_docs(16, 24, seed=1, lo=3, hi=7)
    opts = EkfacOptions(
        find_tracked_modules(model),
        token_batch_size=40,
        progress=False,
        dtype=torch.float64,
        fisher="empirical",
    )
    eigen = eigendecompose(fit_covariances(model, docs, opts))
    corrected = fit_corrected_eigenvalues(model, docs, eigen, opts)
    source = DocumentSource(model, docs, opts)
    total, per_module, tokens = ekfac_self_scores(
        source, eigen, corrected, 0.1, "relative", lengths=docs.lengths
    )
    naive = naive_gradients(model, docs, opts.modules, False)
    exact_total = 0
    for name in opts.modules:
        lam = corrected.tensors[name]["eigenvalues"]
        g = torch.stack([w.flatten() for w, _ in naive[name]])
        f = dense_fisher(eigen, lam, name) + 0.1 * float(lam.mean()) * torch.eye(g.shape[1], dtype=g.dtype)
        np.testing.assert_allclose(
            per_module[name], torch.einsum("ni,ni->n", g, torch.linalg.solve(f, g.T).T)
        )
        exact = g.T @ g / len(g)  # the exact (empirical) Fisher
        delta = 0.1 * float(torch.linalg.eigvalsh(exact).mean())
        exact_total = (
            exact_total
            + torch.einsum(
                "ni,ni->n", g, torch.linalg.solve(exact + delta * torch.eye(len(exact), dtype=g.dtype), g.T).T
            ).numpy()
        )
    assert tokens is not None
    np.testing.assert_allclose([t.sum() for t in tokens], total, rtol=1e-9)
    # the diagonal of `bergson ekfac`'s scores with the training set as its own queries
    queries = precondition_queries(query_gradients(model, docs, opts), eigen, corrected, 0.1, "relative")
    np.testing.assert_allclose(
        np.diagonal(score_documents(model, docs, queries, opts).total), total, rtol=1e-9
    )
    # and it follows the self-influence under the exact (damped) Fisher: measured r = 0.79 on 16 documents
    assert np.corrcoef(total, exact_total)[0, 1] > 0.7


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "cosine"}, "cosine with itself is 1"),
        ({"method": "dto"}, "--method 'dto': choose one of dot, trackstar, ekfac"),
        ({"data": DataConfig()}, "--dataset"),
        ({"fisher": "empirical"}, "--fisher with --method dot: only --method ekfac reads it"),
        ({"method": "ekfac", "projection_dim": 8}, "--projection_dim with --method ekfac"),
        ({"stats_documents": 4}, "--stats_documents with --method dot"),
    ],
)
def test_bad_input_is_refused(tmp_path, model_dir, corpus_file, options, message):
    with pytest.raises(BergsonError, match=message.replace("(", r"\(")):
        self_influence(_cfg(tmp_path, model_dir, corpus_file, "bad", **options))


def test_cli_refuses_cosine_and_typos(tmp_path, corpus_file, capsys):
    with pytest.raises(SystemExit) as e:
        main(
            [
                "self_influence",
                str(tmp_path / "c"),
                "--model",
                "m",
                "--dataset",
                str(corpus_file),
                "--method",
                "cosine",
            ]
        )
    assert e.value.code == 1 and "cosine with itself is 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["self_influence", str(tmp_path / "c"), "--model", "m", "--method", "ekfca"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["self_influence", str(tmp_path / "c"), "--model", "m"])
    assert e.value.code == 1 and "--dataset" in capsys.readouterr().err
