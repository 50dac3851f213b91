"""EK-FAC against the exact Fisher and exact damped influence of a toy model (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bergson.methods.ekfac import (
    EkfacOptions,
    fit_corrected_eigenvalues,
    fit_covariances,
    precondition_queries,
    query_gradients,
    score_documents,
    targets,
)
from bergson.models import find_tracked_modules
from bergson.transforms import ekfac as ekfac_maths
from bergson.transforms.ekfac import (
    Factors,
    add_corrections,
    dense_fisher,
    eigendecompose,
    flat_inner,
    kfac_eigenvalues,
)
from tests.helpers.assets import tiny_neox
from tests.helpers.gradients import naive_gradients, random_docs


def _opts(model, **kw) -> EkfacOptions:
    return EkfacOptions(
        find_tracked_modules(model),
        token_batch_size=kw.pop("token_batch_size", 40),
        progress=False,
        dtype=torch.float64,
        **kw,
    )


@pytest.fixture(scope="module")
def toy():
    model = tiny_neox(vocab=24, hidden=8, layers=1)
    docs = random_docs(200, 24, seed=1, lo=3, hi=9)
    opts = _opts(model, fisher="empirical")
    with pytest.MonkeyPatch.context() as mp:  # factors wider than 10 sum their lower triangle in blocks
        mp.setattr(ekfac_maths, "GRAM_BLOCK", 10)
        cov = fit_covariances(model, docs, opts)
    eigen = eigendecompose(cov)
    corrected = fit_corrected_eigenvalues(model, docs, eigen, opts)
    naive = naive_gradients(model, docs, opts.modules, include_bias=False)
    exact = {}
    for name, grads in naive.items():
        g = torch.stack([w.flatten() for w, _ in grads])
        exact[name] = g.T @ g / len(g)
    return model, docs, opts, cov, eigen, corrected, naive, exact


def test_covariances_equal_their_definitions(toy):
    model, docs, opts, cov, *_ = toy
    xs: dict[str, list] = {n: [] for n in opts.modules}
    gs: dict[str, list] = {n: [] for n in opts.modules}
    outs: dict[str, torch.Tensor] = {}
    for seq in docs.input_ids:
        ids = torch.as_tensor(seq)[None]

        def keep(mod, inputs, output, name):
            xs[name].append(inputs[0][0].detach())
            outs[name] = output

        hooks = [
            m.register_forward_hook(lambda mod, i, o, n=n: keep(mod, i, o, n))
            for n, m in opts.modules.items()
        ]
        logits = model(ids).logits
        for h in hooks:
            h.remove()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        grads = torch.autograd.grad(loss, [outs[n] for n in opts.modules])
        for n, g in zip(opts.modules, grads):
            gs[n].append(g[0])
    tokens = sum(len(s) for s in docs.input_ids)
    for n in opts.modules:
        x, g = torch.cat(xs[n]), torch.cat(gs[n])
        torch.testing.assert_close(cov.tensors[n]["A"], x.T @ x / tokens)
        torch.testing.assert_close(cov.tensors[n]["S"], g.T @ g / len(docs))


def test_ekfac_is_closer_to_the_exact_fisher_than_kfac(toy):
    _, _, opts, _, eigen, corrected, _, exact = toy
    for name in opts.modules:
        f = exact[name]
        ek = dense_fisher(eigen, corrected.tensors[name]["eigenvalues"], name)
        kf = dense_fisher(eigen, kfac_eigenvalues(eigen, name), name)
        err_ek = float((ek - f).norm() / f.norm())
        err_kf = float((kf - f).norm() / f.norm())
        assert err_ek <= err_kf + 1e-12, (name, err_ek, err_kf)
        # EK-FAC is exact on its eigenbasis: its eigenvalues are the diagonal of Qᵀ F Q
        q = torch.kron(eigen.tensors[name]["S_eigenvectors"], eigen.tensors[name]["A_eigenvectors"])
        torch.testing.assert_close(
            torch.diagonal(q.T @ f @ q), corrected.tensors[name]["eigenvalues"].reshape(-1)
        )


def test_both_rotation_orders_of_the_corrections_equal_their_definition():
    # rotating every position (short documents) or each document's gradient (long ones) gives
    # Σ_n (Q_Sᵀ G_n Q_A)², with padding masked out
    gen = torch.Generator().manual_seed(0)
    qs = torch.linalg.qr(torch.randn(9, 9, generator=gen, dtype=torch.float64))[0]
    qa = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))[0]
    for length in (3, 40):  # the cheaper order differs
        x = torch.randn(4, length, 5, generator=gen, dtype=torch.float64)
        mask = torch.rand(4, length, generator=gen) > 0.3
        g = torch.randn(4, length, 9, generator=gen, dtype=torch.float64) * mask[..., None]
        expected = ((qs.T @ (g.mT @ x) @ qa) ** 2).sum(0)
        for m in (mask, None):
            sums: dict[str, torch.Tensor] = {}
            add_corrections(sums, "m", (qs, qa), x, g, m)
            torch.testing.assert_close(sums["m"], expected)


def test_float32_eigendecompositions_score_like_float64_ones(toy):
    # wide float32 factors are eigendecomposed in float32: against float64 eigh of the same float32
    # covariances, the EK-FAC scores agree to 1e-5 of their scale (measured: 3e-7)
    model, docs, _, _, _, _, *_ = toy
    opts = _opts(model, fisher="empirical")
    opts.dtype = torch.float32
    cov = fit_covariances(model, docs, opts)
    qdocs = random_docs(4, 24, seed=7)
    qgrads = query_gradients(model, qdocs, opts)
    got = {}
    for dtype in (torch.float32, torch.float64):
        factors = Factors({n: {k: t.to(dtype) for k, t in d.items()} for n, d in cov.tensors.items()})
        eigen = eigendecompose(factors, float32_width=0)  # float32 on every factor here, not from 2048 wide
        assert eigen.tensors[next(iter(opts.modules))]["S_eigenvectors"].dtype == dtype
        lam = fit_corrected_eigenvalues(model, docs, eigen, opts)
        pre = precondition_queries(qgrads, eigen, lam, 0.1, "relative", dtype=torch.float32)
        got[dtype] = score_documents(model, docs, pre, opts).total
    a, b = got[torch.float32], got[torch.float64]
    err = float(np.abs(a - b).max() / np.abs(b).max())
    assert err < 1e-5, err


def test_one_token_examples_make_kfac_and_ekfac_agree_with_the_fisher_of_one_layer():
    # one token per example, one layer: G_n = g xᵀ, and K-FAC's S ⊗ A is a product of means, not the
    # mean of products; EK-FAC's refit eigenvalues reproduce the Fisher's diagonal in the eigenbasis
    model = tiny_neox(vocab=16, hidden=8, layers=1)
    docs = random_docs(30, 16, seed=2, lo=2, hi=3)
    opts = EkfacOptions(
        {"lm_head": model.lm_head},
        token_batch_size=64,
        progress=False,
        dtype=torch.float64,
        fisher="empirical",
    )
    eigen = eigendecompose(fit_covariances(model, docs, opts))
    lam = fit_corrected_eigenvalues(model, docs, eigen, opts).tensors["lm_head"]["eigenvalues"]
    grads = torch.stack(
        [w.flatten() for w, _ in naive_gradients(model, docs, opts.modules, False)["lm_head"]]
    )
    f = grads.T @ grads / len(grads)
    q = torch.kron(eigen.tensors["lm_head"]["S_eigenvectors"], eigen.tensors["lm_head"]["A_eigenvectors"])
    torch.testing.assert_close(torch.diagonal(q.T @ f @ q), lam.reshape(-1))


def test_influence_against_the_exact_damped_inverse_fisher(toy):
    model, docs, opts, _, eigen, corrected, naive, exact = toy
    qdocs = random_docs(5, 24, seed=9, lo=4, hi=8)
    qgrads = query_gradients(model, qdocs, opts)
    delta = {n: 0.1 * float(corrected.tensors[n]["eigenvalues"].mean()) for n in opts.modules}
    got = 0
    expected = 0
    naive_q = naive_gradients(model, qdocs, opts.modules, False)
    for name in opts.modules:
        pre = precondition_queries({name: qgrads[name]}, eigen, corrected, delta[name], "absolute")
        one = EkfacOptions(
            {name: opts.modules[name]}, token_batch_size=40, progress=False, dtype=torch.float64
        )
        got = got + score_documents(model, docs, pre, one).total
        gq = torch.stack([w.flatten() for w, _ in naive_q[name]])
        torch.testing.assert_close(qgrads[name].reshape(len(qdocs), -1), gq)  # query gradients are exact
        gn = torch.stack([w.flatten() for w, _ in naive[name]])
        f = exact[name] + delta[name] * torch.eye(len(exact[name]), dtype=torch.float64)
        expected = expected + (gn @ torch.linalg.solve(f, gq.T)).numpy()
    r = np.corrcoef(got.ravel(), expected.ravel())[0, 1]
    plain = sum(
        (np.stack([w.flatten() for w, _ in naive[n]]) @ np.stack([w.flatten() for w, _ in naive_q[n]]).T)
        for n in opts.modules
    )
    r_plain = np.corrcoef(plain.ravel(), expected.ravel())[0, 1]
    # measured: 0.86 for EK-FAC (K-FAC 0.85) against 0.62 for the undamped gradient dot product
    assert r > 0.8 and r > r_plain + 0.15, (r, r_plain)


def test_scores_split_exactly_into_modules_and_tokens_and_ignore_batching(toy):
    model, docs, opts, _, eigen, corrected, *_ = toy
    qdocs = random_docs(3, 24, seed=5)
    pre = precondition_queries(query_gradients(model, qdocs, opts), eigen, corrected, 0.1, "relative")
    a = score_documents(model, docs, pre, opts, per_token=True)
    assert a.per_token is not None
    np.testing.assert_allclose(sum(a.per_module.values()), a.total, rtol=1e-12)
    np.testing.assert_allclose(np.stack([t.sum(0) for t in a.per_token]), a.total, rtol=1e-9, atol=1e-12)
    b = score_documents(model, docs, pre, _opts(model, token_batch_size=500))
    np.testing.assert_allclose(b.total, a.total, rtol=1e-9, atol=1e-12)


def test_true_fisher_labels_are_seeded_per_document_and_batch_invariant():
    model = tiny_neox(vocab=24, hidden=8, layers=1)
    docs = random_docs(20, 24, seed=3)
    small = fit_covariances(model, docs, _opts(model, token_batch_size=20, seed=7))
    large = fit_covariances(model, docs, _opts(model, token_batch_size=400, seed=7))
    other = fit_covariances(model, docs, _opts(model, token_batch_size=20, seed=8))
    for n in small.tensors:
        torch.testing.assert_close(small.tensors[n]["S"], large.tensors[n]["S"])
    assert any(not torch.allclose(small.tensors[n]["S"], other.tensors[n]["S"]) for n in small.tensors)
    # sampled targets follow the model's predictive distribution
    logits = torch.log_softmax(torch.randn(1, 2001, 5, dtype=torch.float64), -1) * 0 + torch.log(
        torch.tensor([0.5, 0.2, 0.2, 0.05, 0.05], dtype=torch.float64)
    )
    labels = torch.zeros(1, 2001, dtype=torch.long)
    freq = torch.bincount(targets(logits, labels, np.array([0]), "true", 0)[0, :-1], minlength=5) / 2000
    np.testing.assert_allclose(freq.numpy(), [0.5, 0.2, 0.2, 0.05, 0.05], atol=0.04)


def test_pipeline_resumes_reproduces_and_runs_from_the_shell(tmp_path, model_dir, corpus_file, monkeypatch):
    from bergson import BergsonError, EkfacConfig, ekfac
    from bergson.config import DataConfig
    from bergson.methods.ekfac import command as ekfac_command
    from tests.helpers.cli import run

    data = DataConfig(dataset=str(corpus_file), split="train[:12]", truncation=True, max_length=32)
    query = DataConfig(dataset=str(corpus_file), split="train[20:23]", truncation=True, max_length=32)

    def cfg(name, **kw):
        return EkfacConfig(
            run_path=str(tmp_path / name),
            model=str(model_dir),
            data=data,
            query=query,
            token_batch_size=128,
            modules=[
                "gpt_neox.layers.*"
            ],  # the 8k-vocabulary output layer's 8192² factor is slow to decompose
            **kw,
        )

    def killed(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(ekfac_command, "score_documents", killed)
    with pytest.raises(KeyboardInterrupt):
        ekfac(cfg("a", per_module_scores=True))
    stamp = (tmp_path / "a" / "corrected" / "factors.json").stat().st_mtime_ns
    monkeypatch.undo()
    a = ekfac(cfg("a", per_module_scores=True))
    assert (tmp_path / "a" / "corrected" / "factors.json").stat().st_mtime_ns == stamp
    # an uninterrupted run, same seed: identical, and with token rows that sum to the scores
    b = ekfac(cfg("b", per_module_scores=True, per_token=True))
    np.testing.assert_array_equal(np.asarray(a["scores"]), np.asarray(b["scores"]))
    assert b.has_tokens and not a.has_tokens
    for i in range(len(b)):
        tokens = b.token_rows(i)
        assert len(tokens) == b.rows["num_tokens"][i] > 0
        # float32 sums of terms of both signs: rounding scales with the sum of their magnitudes
        slack = 1e-5 * np.abs(tokens).sum(0)
        assert (np.abs(tokens.sum(0) - b["scores"][i]) <= slack).all()
    parts = np.load(tmp_path / "a" / "per_module.npz")
    np.testing.assert_allclose(
        sum(parts[k] for k in parts.files), np.asarray(a["scores"]), rtol=1e-5, atol=1e-6
    )
    assert a["scores"].shape == (12, 3)
    with pytest.raises(BergsonError, match="--overwrite"):
        ekfac(cfg("a", damping=0.5))
    proc = run(
        "ekfac", str(tmp_path / "cli"), "--model", str(model_dir), "--dataset", str(corpus_file), "--split", "train[:12]",
        "--truncation", "--max_length", "32", "--token_batch_size", "128", "--query.dataset", str(corpus_file),
        "--query.split", "train[20:23]", "--query.truncation", "--query.max_length", "32", "--top_k", "2",
        "--modules", "gpt_neox.layers.*",
    )  # fmt: skip
    assert "query 2:" in proc.stdout
    np.testing.assert_allclose(
        np.asarray(load(tmp_path / "cli" / "scores")["scores"]), np.asarray(a["scores"]), rtol=1e-5
    )


def load(path):
    from bergson import load_gradients

    return load_gradients(path)


def test_module_subsets_in_separate_passes_equal_one_pass(toy):
    model, docs, opts, cov, eigen, corrected, *_ = toy
    names = list(opts.modules)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    qdocs = random_docs(3, 24, seed=4)
    full = score_documents(
        model,
        docs,
        precondition_queries(query_gradients(model, qdocs, opts), eigen, corrected, 0.1, "relative"),
        opts,
    )
    total = 0
    for half in halves:
        sub = _opts(model, fisher="empirical")
        sub.modules = {n: opts.modules[n] for n in half}
        c = fit_covariances(model, docs, sub)
        for n in half:
            torch.testing.assert_close(c.tensors[n]["A"], cov.tensors[n]["A"])
            torch.testing.assert_close(c.tensors[n]["S"], cov.tensors[n]["S"])
        e = eigendecompose(c)
        lam = fit_corrected_eigenvalues(model, docs, e, sub)
        pre = precondition_queries(query_gradients(model, qdocs, sub), e, lam, 0.1, "relative")
        total = total + score_documents(model, docs, pre, sub).total
    np.testing.assert_allclose(total, full.total, rtol=1e-8, atol=1e-10)


def test_low_rank_queries_are_exact_at_full_rank_and_their_error_is_the_svd_tail(toy):
    model, docs, opts, _, eigen, corrected, *_ = toy
    qdocs = random_docs(4, 24, seed=6)
    grads = query_gradients(model, qdocs, opts)
    full = precondition_queries(grads, eigen, corrected, 0.1, "relative")
    exact = score_documents(model, docs, full, opts, per_token=True)
    widest = max(min(g.shape[1:]) for g in grads.values())
    same = precondition_queries(grads, eigen, corrected, 0.1, "relative", rank=widest)
    got = score_documents(model, docs, same, opts, per_token=True)
    np.testing.assert_allclose(got.total, exact.total, rtol=1e-9, atol=1e-12)
    assert got.per_token is not None
    np.testing.assert_allclose(np.stack([t.sum(0) for t in got.per_token]), got.total, rtol=1e-9, atol=1e-12)
    one = precondition_queries(grads, eigen, corrected, 0.1, "relative", rank=1)
    for name, err in one.meta["relative_error"].items():
        p = full.tensors[name]["ihvp"]
        approx = one.tensors[name]["left"] @ one.tensors[name]["right"]
        assert err == pytest.approx(float((approx - p).norm() / p.norm()), rel=1e-9)
        assert 0 < err < 1
    # rank one scores the same as exact scoring of the rank-one products
    recon = type(full)({n: {"ihvp": d["left"] @ d["right"]} for n, d in one.tensors.items()}, full.meta)
    np.testing.assert_allclose(
        score_documents(model, docs, one, opts).total,
        score_documents(model, docs, recon, opts).total,
        rtol=1e-9,
        atol=1e-12,
    )
    with pytest.raises(Exception, match="--query_rank"):
        precondition_queries(grads, eigen, corrected, 0.1, "relative", rank=-1)


def test_projected_query_store_scores_like_ekfac_through_bergson_score(tmp_path, model_dir, corpus_file):
    from bergson import BergsonError, EkfacConfig, IndexConfig, ScoreConfig, build, ekfac, score
    from bergson.config import DataConfig
    from bergson.transforms.ekfac import Factors
    from bergson.transforms.projection import projection_matrix

    data = DataConfig(dataset=str(corpus_file), split="train[:16]", truncation=True, max_length=32)
    query = DataConfig(dataset=str(corpus_file), split="train[20:23]", truncation=True, max_length=32)
    common = dict(
        model=str(model_dir), token_batch_size=256, modules=["gpt_neox.layers.*"], include_bias=True
    )

    def run(p):
        out = ekfac(
            EkfacConfig(
                run_path=str(tmp_path / f"ek{p}"), data=data, query=query, projected_queries=True,
                projection_dim=p, factor_dtype="float64", **common,
            )
        )  # fmt: skip
        build(
            IndexConfig(
                run_path=str(tmp_path / f"idx{p}"),
                data=data,
                projection_dim=p,
                save_dtype="float32",
                **common,
            )
        )
        scores = score(
            ScoreConfig(run_path=str(tmp_path / f"s{p}"), query_path=str(tmp_path / f"ek{p}" / "query_store"),
                        index=str(tmp_path / f"idx{p}"), **common)
        )  # fmt: skip
        assert scores.manifest.preconditioner["kind"] == "ekfac"
        return np.asarray(out["scores"], np.float64), np.asarray(scores["scores"], np.float64)

    # p = 0: the full products in a full-gradient store's layout; bergson score gives EK-FAC's scores
    exact, full = run(0)
    np.testing.assert_allclose(full, exact, rtol=2e-3, atol=1e-3 * np.abs(exact).max())
    # p = 8: per module ⟨L P Rᵀ, L G Rᵀ⟩ with the build's own projection matrices
    _, projected = run(8)
    store = load(tmp_path / "ek8" / "query_store")
    assert store.manifest.preconditioner["kind"] == "ekfac" and len(store) == 3
    queries = Factors.load(tmp_path / "ek8" / "queries")
    grads = load(tmp_path / "idx0")
    expected = 0
    for m in grads.manifest.modules:
        out, n_in = m.shape
        g = np.asarray(grads[m.name], np.float64)
        g = torch.from_numpy(
            np.concatenate([g[:, : out * n_in].reshape(-1, out, n_in), g[:, out * n_in :, None]], 2)
        )
        p = queries.tensors[m.name]["ihvp"]
        left = projection_matrix(0, m.name, "left", 8, out, dtype=torch.float64)
        right = projection_matrix(0, m.name, "right", 8, n_in + 1, dtype=torch.float64)
        expected = expected + torch.einsum("nab,qab->nq", left @ g @ right.T, left @ p @ right.T).numpy()
    np.testing.assert_allclose(projected, expected, rtol=2e-3, atol=1e-3 * np.abs(expected).max())
    # applying any preconditioner again, or cosine scores, is refused
    with pytest.raises(BergsonError, match="unit_normalize"):
        score(ScoreConfig(run_path=str(tmp_path / "c"), query_path=str(tmp_path / "ek8" / "query_store"),
                          index=str(tmp_path / "idx8"), unit_normalize=True, **common))  # fmt: skip
    with pytest.raises(BergsonError, match="twice"):
        score(ScoreConfig(run_path=str(tmp_path / "d"), query_path=str(tmp_path / "ek8" / "query_store"),
                          index=str(tmp_path / "idx8"), preconditioner_path=str(tmp_path / "nowhere"), **common))  # fmt: skip


def test_fisher_samples_average_the_draws_of_their_seeds():
    """--fisher_samples K: the covariances, the corrected eigenvalues (in a fixed eigenbasis) and the
    Fisher-vector products of --ihvp are the means of K single-draw fits seeded fisher_seed + STRIDE k;
    the empirical Fisher (the same labels at every draw) refuses it."""
    from types import SimpleNamespace

    from bergson.errors import BergsonError
    from bergson.methods.ekfac import document_products
    from bergson.methods.ekfac.command import pass_options
    from bergson.methods.ekfac.passes import DRAW_STRIDE

    model = tiny_neox(vocab=24, hidden=8, layers=1)
    docs = random_docs(12, 24, seed=4)
    three = _opts(model, seed=5, fisher_samples=3)
    singles = [_opts(model, seed=5 + DRAW_STRIDE * k) for k in range(3)]
    cov = fit_covariances(model, docs, three)
    parts = [fit_covariances(model, docs, o) for o in singles]
    assert cov.meta["fisher_samples"] == 3
    for n in cov.tensors:
        for key in ("A", "S"):
            torch.testing.assert_close(cov.tensors[n][key], sum(p.tensors[n][key] for p in parts) / 3)
    assert any(not torch.allclose(parts[0].tensors[n]["S"], parts[1].tensors[n]["S"]) for n in cov.tensors)
    eigen = eigendecompose(cov)
    corrected = fit_corrected_eigenvalues(model, docs, eigen, three)
    each = [fit_corrected_eigenvalues(model, docs, eigen, o) for o in singles]
    for n in corrected.tensors:
        want = sum(c.tensors[n]["eigenvalues"] for c in each) / 3
        torch.testing.assert_close(corrected.tensors[n]["eigenvalues"], want)
    gen = torch.Generator().manual_seed(0)
    v = {
        n: torch.randn(2, *t["eigenvalues"].shape, generator=gen, dtype=torch.float64)
        for n, t in corrected.tensors.items()
    }
    prods = document_products(model, docs, three, 0, 0, torch.float64)(0, v)
    single = [document_products(model, docs, o, 0, 0, torch.float64)(0, v) for o in singles]
    for n in v:
        torch.testing.assert_close(prods[n], sum(s[n] for s in single) / 3)
    cfg = SimpleNamespace(token_batch_size=64, include_bias=False, fisher="empirical", fisher_seed=0,
                          fisher_samples=2, factor_dtype="float32")  # fmt: skip
    with pytest.raises(BergsonError, match="--fisher_samples 2 with --fisher empirical"):
        pass_options(cfg, three.modules, SimpleNamespace(pad_token_id=0), False)


def test_flat_inner_is_the_frobenius_inner_product_of_every_pair():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, 4, generator=gen), torch.randn(2, 5, 4, generator=gen).transpose(1, 2)
    b = b.contiguous().transpose(1, 2)  # a non-contiguous view is read as it stands
    want = torch.tensor([[float((a[n] * b[q]).sum()) for q in range(2)] for n in range(3)])
    torch.testing.assert_close(flat_inner(a, b), want)
