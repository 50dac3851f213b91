"""ASTRA, LiSSA and PCG iHVPs against a dense damped solve with the exact Fisher of a toy model (float64).

``python tests/methods/test_astra.py`` prints the relative error against the dense solve per step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bergson.methods.ekfac import (
    EkfacOptions,
    IhvpOptions,
    document_products,
    fit_corrected_eigenvalues,
    fit_covariances,
    precondition_queries,
    query_gradients,
    solve,
)
from bergson.models import find_tracked_modules
from bergson.transforms.ekfac import damping_value, eigendecompose
from tests.helpers.assets import tiny_neox
from tests.helpers.gradients import naive_gradients, random_docs

DAMPING = 0.1


def _toy():
    model = tiny_neox(vocab=24, hidden=8, layers=1)
    docs = random_docs(120, 24, seed=1, lo=3, hi=9)
    opts = EkfacOptions(
        find_tracked_modules(model),
        token_batch_size=80,
        progress=False,
        dtype=torch.float64,
        fisher="empirical",
    )
    eigen = eigendecompose(fit_covariances(model, docs, opts))
    corrected = fit_corrected_eigenvalues(model, docs, eigen, opts)
    grads = query_gradients(model, random_docs(3, 24, seed=7), opts)
    exact, fishers = {}, {}
    for name, per_doc in naive_gradients(model, docs, opts.modules, include_bias=False).items():
        g = torch.stack([w.flatten() for w, _ in per_doc])
        fisher = fishers[name] = g.T @ g / len(g)
        delta = damping_value(corrected.tensors[name]["eigenvalues"], DAMPING, "relative")
        q = grads[name].reshape(len(grads[name]), -1)
        sol = torch.linalg.solve(fisher + delta * torch.eye(len(fisher), dtype=fisher.dtype), q.T).T
        exact[name] = sol.reshape(grads[name].shape)
    return model, docs, opts, eigen, corrected, grads, exact, fishers


@pytest.fixture(scope="module")
def toy():
    return _toy()


def dense_products(fishers):
    """G v with the exact Fisher formed densely (fast, for iterating many steps)."""

    def products(step, v):
        return {n: (t.reshape(len(t), -1) @ fishers[n]).reshape(t.shape) for n, t in v.items()}

    return products


def _error(v, exact) -> float:
    num = sum(float((v[n] - exact[n]).square().sum()) for n in exact)
    return (num / sum(float(e.square().sum()) for e in exact.values())) ** 0.5


def dense_solve(toy, damping):
    _model, _docs, _opts, _eigen, corrected, grads, _exact, fishers = toy
    out = {}
    for name, fisher in fishers.items():
        delta = damping_value(corrected.tensors[name]["eigenvalues"], damping, "relative")
        q = grads[name].reshape(len(grads[name]), -1)
        sol = torch.linalg.solve(fisher + delta * torch.eye(len(fisher), dtype=fisher.dtype), q.T).T
        out[name] = sol.reshape(grads[name].shape)
    return out


def errors_by_step(toy, method: str, steps: int, products=None, damping=DAMPING, **kw) -> list[float]:
    """The relative error against the dense solve after 1..steps iterations (exact products:
    formed densely unless ``products`` is given)."""
    _model, _docs, _opts, eigen, corrected, grads, _, fishers = toy
    exact = dense_solve(toy, damping)
    products = products or dense_products(fishers)
    history: list[float] = []

    def seen(step, v):
        history.append(_error(v, exact))

    opts_ = IhvpOptions(method, steps, **kw)
    solve(grads, eigen, corrected, damping, "relative", opts_, products, observe=seen)
    return history


def test_astra_one_step_is_ekfac(toy):
    _model, _docs, _opts, eigen, corrected, grads, exact, _fishers = toy

    def never(step, v):
        raise AssertionError("one ASTRA step from zero needs no Fisher-vector product")

    v, meta = solve(grads, eigen, corrected, DAMPING, "relative", IhvpOptions("astra", 1), never)
    ek = precondition_queries(grads, eigen, corrected, DAMPING, "relative")
    for name in grads:
        torch.testing.assert_close(v[name], ek.tensors[name]["ihvp"], rtol=0, atol=0)
    assert meta["ihvp"] == "astra" and meta["ihvp_residuals"] == [1.0]
    # EK-FAC is only an approximation here: the dense solve differs
    assert _error(v, exact) > 1e-3


def test_document_products_are_the_exact_fisher_products(toy):
    model, docs, opts, _eigen, _corrected, grads, _exact, fishers = toy
    got = document_products(model, docs, opts, 0, 0, torch.float64)(1, grads)
    want = dense_products(fishers)(1, grads)
    for name in grads:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-14)
    # a few steps on the documents' passes follow the dense iterates
    passes = errors_by_step(toy, "astra", 4, document_products(model, docs, opts, 0, 0, torch.float64))
    np.testing.assert_allclose(passes, errors_by_step(toy, "astra", 4), rtol=1e-8)


def test_astra_and_lissa_converge_to_the_dense_solve_astra_far_sooner(toy):
    # damping 1 × mean eigenvalue keeps LiSSA's step count affordable in a test; line-searched steps
    astra = errors_by_step(toy, "astra", 150, damping=1.0)
    lissa = errors_by_step(toy, "lissa", 700, damping=1.0)
    assert astra[-1] < 1e-6 and lissa[-1] < 1e-6
    # the textbook fixed steps converge too (ASTRA 0.5 after EK-FAC's; LiSSA 1 / (λ_max + δ))
    assert errors_by_step(toy, "astra", 150, damping=1.0, step_size=0.5)[-1] < 1e-6
    assert errors_by_step(toy, "lissa", 1200, damping=1.0, step_size=1.0)[-1] < 1e-6

    def first(errs, tol):
        return next(k + 1 for k, e in enumerate(errs) if e < tol)

    for tol in (1e-2, 1e-4, 1e-6):
        assert first(lissa, tol) > 3 * first(astra, tol)
    assert first(astra, 1e-6) <= 60  # about 45 measured; LiSSA about 200
    # the error falls: ten steps are well below one step's (EK-FAC's)
    assert astra[9] < 0.5 * astra[0]


def test_pcg_converges_in_far_fewer_steps_than_astra(toy):
    """Conjugate gradients preconditioned by EK-FAC: the error falls with the steps, is below
    ASTRA's at every equal step after the first (whose line-searched EK-FAC step differs from
    ASTRA's plain one), and reaches 1e-6 at damping 0.1 in under 35 steps where ASTRA is still at
    about 3e-2 after 40 (measured: 28 steps; at damping 1, 17 against ASTRA's 45)."""
    astra = errors_by_step(toy, "astra", 40)
    pcg = errors_by_step(toy, "pcg", 40)
    assert pcg[9] < 0.1 * pcg[0] and pcg[-1] < 1e-8
    assert all(pcg[k] < astra[k] for k in range(1, 40))
    assert next(k + 1 for k, e in enumerate(pcg) if e < 1e-6) <= 35 and astra[-1] > 1e-2
    # the documents' passes give the dense iterates
    model, docs, opts, *_ = toy
    passes = errors_by_step(toy, "pcg", 4, document_products(model, docs, opts, 0, 0, torch.float64))
    np.testing.assert_allclose(passes, pcg[:4], rtol=1e-8)


def test_minibatch_products_are_seeded_and_a_full_batch_is_exact(toy):
    model, docs, opts, *_ = toy

    def run(size, seed):
        products = document_products(model, docs, opts, size, seed, torch.float64)
        return errors_by_step(toy, "astra", 4, products, step_size=0.3)

    a = run(40, 3)
    assert a == run(40, 3)
    assert a[1:] != run(40, 4)[1:] and a[0] == run(40, 4)[0]  # step 1 (EK-FAC) draws nothing
    # a batch as large as the corpus is the exact product
    np.testing.assert_allclose(run(len(docs), 3), errors_by_step(toy, "astra", 4, step_size=0.3), rtol=1e-8)


def test_bad_iteration_options_are_refused(toy):
    from bergson import BergsonError

    _model, _docs, _opts, eigen, corrected, grads, _exact, fishers = toy
    products = dense_products(fishers)
    for bad, match in [
        (IhvpOptions("astra", 0), "--ihvp_steps"),
        (IhvpOptions("lissa", 3, -1), "--ihvp_batch_size"),
        (IhvpOptions("lissa", 3, 0, float("nan")), "--ihvp_step_size"),
        (IhvpOptions("lissa", 3, 0, -1.0), "--ihvp_step_size"),
        (IhvpOptions("ekfac", 5), "--ihvp_steps"),
        (IhvpOptions("newton"), "--ihvp"),
        (IhvpOptions("pcg", 3, 40), "--ihvp pcg with"),
        (IhvpOptions("pcg", 3, 0, 0.5), "--ihvp pcg with"),
        (IhvpOptions("pcg", 3, 0, 0.0, 2), "--ihvp pcg with"),
    ]:
        with pytest.raises(BergsonError, match=match):
            solve(grads, eigen, corrected, DAMPING, "relative", bad, products)
    # a LiSSA step far above 2 / λ_max diverges: detected and refused, not NaN products
    with pytest.raises(BergsonError, match=r"diverges.*--ihvp_step_size"):
        solve(grads, eigen, corrected, DAMPING, "relative", IhvpOptions("lissa", 200, 0, 30.0), products)


if __name__ == "__main__":
    state = _toy()
    for damping, n in [(0.1, 3000), (1.0, 600)]:
        runs = {
            (m, size): errors_by_step(state, m, n, damping=damping, step_size=size)
            for m in ("astra", "lissa")
            for size in (0.0, 0.5)
        }
        runs["pcg", 0.0] = errors_by_step(state, "pcg", n, damping=damping)
        print(f"relative error of v_k against the dense (G + {damping} mean(Λ) I)⁻¹ g; step 0: line search")
        print("step " + "".join(f"{m + ' step ' + str(size):>18}" for m, size in runs))
        for k in [1, 2, 3, 5, 10, 20, 50, 100, 200, 300, 500, 1000, 2000, 3000]:
            if k <= n:
                print(f"{k:4d} " + "".join(f"{errs[k - 1]:18.3e}" for errs in runs.values()))


def test_cli_astra_runs_end_to_end_records_itself_and_correlates_with_ekfac(tmp_path, model_dir, corpus_file):
    import json

    from scipy.stats import spearmanr

    from bergson import BergsonError, EkfacConfig, ekfac, load_gradients
    from bergson.config import DataConfig
    from tests.helpers.cli import run

    common = ["--dataset", str(corpus_file), "--split", "train[:12]", "--truncation", "--max_length", "32",
              "--query.dataset", str(corpus_file), "--query.split", "train[20:23]", "--query.truncation",
              "--query.max_length", "32", "--token_batch_size", "128", "--modules", "gpt_neox.layers.*",
              "--factor_dtype", "float64", "--top_k", "0"]  # fmt: skip
    data = DataConfig(dataset=str(corpus_file), split="train[:12]", truncation=True, max_length=32)
    query = DataConfig(dataset=str(corpus_file), split="train[20:23]", truncation=True, max_length=32)

    def cfg(name, **kw):
        return EkfacConfig(
            run_path=str(tmp_path / name), model=str(model_dir), data=data, query=query, token_batch_size=128,
            modules=["gpt_neox.layers.*"], factor_dtype="float64", top_k=0, **kw,
        )  # fmt: skip

    base = np.asarray(ekfac(cfg("ek"))["scores"], np.float64)
    run(
        "ekfac",
        str(tmp_path / "astra"),
        "--model",
        str(model_dir),
        *common,
        "--ihvp",
        "astra",
        "--ihvp_steps",
        "3",
    )
    astra = np.asarray(load_gradients(tmp_path / "astra" / "scores")["scores"], np.float64)
    meta = json.loads((tmp_path / "astra" / "queries" / "factors.json").read_text())
    assert meta["ihvp"] == "astra" and meta["ihvp_steps"] == 3 and len(meta["ihvp_residuals"]) == 3
    assert meta["ihvp_residuals"][0] == 1.0 and np.isfinite(meta["ihvp_residuals"]).all()
    assert json.loads((tmp_path / "ek" / "queries" / "factors.json").read_text())["ihvp"] == "ekfac"
    assert "astra" in (tmp_path / "astra" / "scores" / "manifest.json").read_text()
    assert base.shape == astra.shape == (12, 3)
    assert not np.allclose(astra, base, rtol=1e-3)
    for q in range(3):
        assert spearmanr(astra[:, q], base[:, q]).statistic > 0.5
    # one ASTRA step is EK-FAC's answer: the same scores
    one = np.asarray(ekfac(cfg("one", ihvp="astra", ihvp_steps=1))["scores"], np.float64)
    np.testing.assert_allclose(one, base, rtol=1e-9, atol=1e-12 * np.abs(base).max())
    # refused, with the option named: iteration options without an iteration, zero steps, a diverging LiSSA
    with pytest.raises(BergsonError, match="--ihvp_steps"):
        ekfac(cfg("bad1", ihvp_steps=5))
    proc = run("ekfac", str(tmp_path / "bad2"), "--model", str(model_dir), *common, "--ihvp", "lissa",
               "--ihvp_steps", "0", check=False)  # fmt: skip
    assert proc.returncode == 1 and "--ihvp_steps" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    # conjugate gradients from the command: recorded, away from EK-FAC's answer, ranked alike
    pcg = np.asarray(ekfac(cfg("pcg", ihvp="pcg", ihvp_steps=3))["scores"], np.float64)
    meta = json.loads((tmp_path / "pcg" / "queries" / "factors.json").read_text())
    assert meta["ihvp"] == "pcg" and len(meta["ihvp_residuals"]) == 3
    assert not np.allclose(pcg, base, rtol=1e-3)
    for q in range(3):
        assert spearmanr(pcg[:, q], base[:, q]).statistic > 0.5
    with pytest.raises(BergsonError, match="diverges"):
        ekfac(cfg("bad3", ihvp="lissa", ihvp_steps=100, ihvp_step_size=40.0))
    assert not (tmp_path / "bad3" / "scores").exists()


def test_custom_model_astra_from_python_converges_to_exact_influence():
    from bergson.methods.custom import ekfac_scores, fit_ekfac
    from tests.collect.test_generic import N, batched, data, loss_fn, mlp, naive

    model, (x, y) = mlp(), data()
    xq, yq = data(seed=9, n=3)
    factors = fit_ekfac(model, batched(x, y, 4), loss_fn, progress=False)

    def scores(**kw):
        return ekfac_scores(
            model, factors, batched(x, y, 5), [(xq, yq)], loss_fn, damping=1.0, progress=False, **kw
        )

    base = scores()
    torch.testing.assert_close(scores(ihvp="astra", ihvp_steps=1), base, rtol=1e-12, atol=1e-14)
    truth, query_truth = naive(model, x, y, bias=False), naive(model, xq, yq, bias=False)
    want = torch.zeros(N, 3, dtype=torch.float64)
    for name, g in truth.items():
        lam = factors.corrected.tensors[name]["eigenvalues"]
        fisher = g.reshape(N, -1).T @ g.reshape(N, -1) / N
        eye = torch.eye(len(fisher), dtype=fisher.dtype)
        want += g.reshape(N, -1) @ torch.linalg.solve(
            fisher + lam.mean() * eye, query_truth[name].reshape(3, -1).T
        )
    got = scores(ihvp="astra", ihvp_steps=200)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    assert float((base - want).abs().max()) > 1e-3 * float(want.abs().max())  # EK-FAC alone is not exact
    # conjugate gradients from Python reach it with a fifth of the steps ASTRA is given above
    got = scores(ihvp="pcg", ihvp_steps=40)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
