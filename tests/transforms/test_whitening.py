"""K-FAC whitening (``--whitening``): S^-1/2 G A^-1/2 against naive per-example autograd and dense
damped factors, and dot products of whitened stores against K-FAC influence solved densely."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch

from bergson import AttentionConfig, BergsonError, collect_gradients
from bergson.core.layout import module_shape
from bergson.models import find_tracked_modules
from bergson.transforms.ekfac import Factors
from bergson.transforms.projection import projection_matrix
from bergson.transforms.whitening import whitening_from_ekfac
from tests.helpers.assets import tiny_gpt2, tiny_neox
from tests.helpers.gradients import naive_gradients, random_docs

DAMPING = 0.01


def random_spd(n: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, 3 * n, generator=gen, dtype=torch.float64)
    return x @ x.T / (3 * n) + 0.01 * torch.eye(n, dtype=torch.float64)


def damped_inverse_sqrt(m: torch.Tensor) -> np.ndarray:
    """(M + sqrt(δ) mean-eigenvalue I)^-1/2 densely: the mean eigenvalue as the trace's mean."""
    a = m.numpy() + DAMPING**0.5 * np.trace(m.numpy()) / len(m) * np.eye(len(m))
    return np.linalg.inv(np.real(scipy.linalg.sqrtm(a)))


def fake_fit(path, modules, include_bias: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random SPD factors (S, A) per module, saved as an EK-FAC eigen stage at ``path``."""
    gen = torch.Generator().manual_seed(7)
    dense, tensors = {}, {}
    for name, m in modules.items():
        out, n_in = module_shape(m)
        width = n_in + int(include_bias and m.bias is not None)
        s, a = random_spd(out, gen), random_spd(width, gen)
        dense[name] = (s, a)
        (es, vs), (ea, va) = torch.linalg.eigh(s), torch.linalg.eigh(a)
        tensors[name] = {"S_eigenvalues": es, "S_eigenvectors": vs, "A_eigenvalues": ea, "A_eigenvectors": va}
    Factors(tensors, {"stage": "eigen"}).save(path / "eigen")
    return dense


@pytest.mark.parametrize("arch", ["neox", "gpt2"])
@pytest.mark.parametrize("include_bias", [False, True])
@pytest.mark.parametrize("p", [0, 4])
def test_whitened_gradients_match_naive_autograd(tmp_path, arch, include_bias, p):
    model = {"neox": tiny_neox, "gpt2": tiny_gpt2}[arch]()
    modules = find_tracked_modules(model)
    docs = random_docs(5, model.config.vocab_size)
    dense = fake_fit(tmp_path, modules, include_bias)
    whitening = whitening_from_ekfac(tmp_path, modules, include_bias, DAMPING)
    sink = collect_gradients(
        model, docs, projection_dim=p, include_bias=include_bias, normalizers=whitening, token_batch_size=40,
        seed=3, progress=False,
    )  # fmt: skip
    got = sink.by_module()
    naive = naive_gradients(model, docs, modules, include_bias)
    for name, m in modules.items():
        s, a = (damped_inverse_sqrt(f) for f in dense[name])
        for n, (w, b) in enumerate(naive[name]):
            g = (torch.cat([w, b[:, None]], 1) if b is not None else w).numpy()
            white = s @ g @ a
            if p:
                left = projection_matrix(3, name, "left", p, module_shape(m)[0], dtype=torch.float64).numpy()
                right = projection_matrix(3, name, "right", p, g.shape[1], dtype=torch.float64).numpy()
                expected = (left @ white @ right.T).ravel()
            else:  # the store's layout: the weight (in the parameter's own orientation), then the bias
                weight = white[:, : w.shape[1]]
                weight = weight.T if type(m).__name__ == "Conv1D" else weight
                expected = np.concatenate([weight.ravel(), white[:, w.shape[1] :].T.ravel()])
            np.testing.assert_allclose(np.asarray(got[name][n]), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("p", [0, 4])
def test_whitened_token_vectors_sum_to_the_documents(tmp_path, p):
    """--per_token with whitening: each position's whitened term, summed, is the document's vector
    (whitening is linear), and the documents' vectors do not depend on the batching."""
    model = tiny_neox()
    modules = find_tracked_modules(model)
    fake_fit(tmp_path, modules, True)
    whitening = whitening_from_ekfac(tmp_path, modules, True, DAMPING)
    docs = random_docs(5, model.config.vocab_size)
    kw = dict(projection_dim=p, include_bias=True, normalizers=whitening, progress=False)
    whole = collect_gradients(model, docs, token_batch_size=40, **kw)
    tokens = collect_gradients(model, docs, token_batch_size=12, per_token=True, **kw)
    np.testing.assert_allclose(np.asarray(tokens.vectors), np.asarray(whole.vectors), rtol=1e-9, atol=1e-12)
    for row in range(len(docs)):
        summed = np.asarray(tokens.tokens[row]).sum(0)
        np.testing.assert_allclose(summed, np.asarray(whole.vectors)[row], rtol=1e-9, atol=1e-12)


def test_whitened_dot_products_are_kfac_influence(tmp_path):
    """⟨whitened q, whitened g⟩ summed over modules equals ⟨Q, S_λ^-1 G A_λ^-1⟩ solved densely."""
    model = tiny_neox()
    modules = find_tracked_modules(model)
    dense = fake_fit(tmp_path, modules, True)
    whitening = whitening_from_ekfac(tmp_path, modules, True, DAMPING)
    docs, queries = random_docs(6, model.config.vocab_size), random_docs(2, model.config.vocab_size, seed=5)

    def vectors(d):
        kw = dict(projection_dim=0, include_bias=True, token_batch_size=40, progress=False)
        return collect_gradients(model, d, normalizers=whitening, **kw).vectors

    got = vectors(docs) @ vectors(queries).T
    g, q = naive_gradients(model, docs, modules, True), naive_gradients(model, queries, modules, True)
    expected = np.zeros_like(got)
    for name in modules:
        s, a = (f.numpy() + DAMPING**0.5 * np.trace(f.numpy()) / len(f) * np.eye(len(f)) for f in dense[name])
        for i, (w, b) in enumerate(g[name]):
            gi = torch.cat([w, b[:, None]], 1).numpy() if b is not None else w.numpy()
            solved = np.linalg.solve(s, gi) @ np.linalg.inv(a)
            for j, (wq, bq) in enumerate(q[name]):
                qj = torch.cat([wq, bq[:, None]], 1).numpy() if bq is not None else wq.numpy()
                expected[i, j] += (qj * solved).sum()
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-12 * np.abs(expected).max())


def test_wide_factors_are_kept_in_float32(tmp_path):
    from bergson.transforms.whitening import _inverse_sqrt

    values, vectors = torch.rand(2048, dtype=torch.float64) + 0.1, torch.eye(2048, dtype=torch.float64)
    wide, narrow = (
        _inverse_sqrt(values, vectors, DAMPING, True),
        _inverse_sqrt(values[:8], vectors[:8, :8], DAMPING, True),
    )
    assert wide.dtype == torch.float32 and narrow.dtype == torch.float64
    expected = (values + DAMPING**0.5 * values.mean()).rsqrt()
    torch.testing.assert_close(wide.diagonal().double(), expected, rtol=1e-6, atol=0)


def test_refusals(tmp_path):
    model = tiny_neox()
    modules = find_tracked_modules(model)
    with pytest.raises(BergsonError, match="no fitted eigenbases there"):
        whitening_from_ekfac(tmp_path / "missing", modules, False)
    fake_fit(tmp_path, dict(list(modules.items())[:1]), False)
    with pytest.raises(BergsonError, match="were not fitted there"):
        whitening_from_ekfac(tmp_path, modules, False)
    first = dict(list(modules.items())[:1])
    with pytest.raises(BergsonError, match="same model and --include_bias"):
        whitening_from_ekfac(tmp_path, first, True)
    whitening = whitening_from_ekfac(tmp_path, first, False)
    name, module = next(iter(first.items()))
    with pytest.raises(BergsonError, match="head or expert blocks"):
        collect_gradients(
            model, random_docs(2, model.config.vocab_size), modules=first, normalizers=whitening,
            heads={name: AttentionConfig(2, module_shape(module)[0] // 2, 0)}, progress=False,
        )  # fmt: skip


def test_whitening_from_a_fitted_ekfac_run_through_build_and_score(tmp_path, model_dir, corpus_file):
    """``bergson ekfac`` fits the factors; ``build --whitening`` on both sides and ``score`` give
    ⟨Q, S_λ^-1 G A_λ^-1⟩ with that run's covariances; a plain store is refused against a whitened one."""
    from bergson import EkfacConfig, IndexConfig, ScoreConfig, build, ekfac, score
    from bergson.collect.losses import per_document_loss
    from bergson.config import DataConfig
    from bergson.models import load_model
    from bergson.search.attributor import Attributor
    from bergson.transforms.normalizers import KfacWhitening
    from tests.helpers.cli import run_in_process

    data = DataConfig(dataset=str(corpus_file), split="train[:10]", truncation=True, max_length=24)
    query = DataConfig(dataset=str(corpus_file), split="train[20:22]", truncation=True, max_length=24)
    common = dict(model=str(model_dir), device="cpu", precision="fp32", modules=["gpt_neox.layers.0.*"])
    ek = tmp_path / "ek"
    ekfac(EkfacConfig(run_path=str(ek), data=data, query=query, factor_dtype="float64", **common))
    stores = {}
    for side, d in (("train", data), ("query", query)):
        for white in (True, False):
            stores[side, white] = build(
                IndexConfig(
                    run_path=str(tmp_path / f"{side}{white}"), data=d, projection_dim=0, save_dtype="float32",
                    whitening=str(ek) if white else None, **common,
                )
            )  # fmt: skip
    assert stores["train", True].manifest.normalizer["kind"] == "kfac_whitening"
    got = score(
        ScoreConfig(run_path=str(tmp_path / "s"), index=str(stores["train", True].root),
                    query_path=str(stores["query", True].root))
    )  # fmt: skip
    cov = Factors.load(ek / "covariances")
    plain_g, plain_q = stores["train", False], stores["query", False]
    expected = 0
    for m in plain_g.manifest.modules:
        s, a = (cov.tensors[m.name][k].double().numpy() for k in ("S", "A"))
        s, a = (f + DAMPING**0.5 * np.trace(f) / len(f) * np.eye(len(f)) for f in (s, a))
        g = np.asarray(plain_g[m.name], np.float64).reshape(-1, *m.shape)
        q = np.asarray(plain_q[m.name], np.float64).reshape(-1, *m.shape)
        expected = expected + np.einsum("nab,qab->nq", np.linalg.solve(s, g) @ np.linalg.inv(a), q)
    scores = np.asarray(got["scores"], np.float64)
    np.testing.assert_allclose(scores, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())
    with pytest.raises(BergsonError, match="normalizer differs"):
        score(ScoreConfig(run_path=str(tmp_path / "s2"), index=str(stores["train", True].root),
                          query_path=str(plain_q.root)))  # fmt: skip
    # bergson query / the Attributor whiten a live query's gradient with the store's saved matrices
    text = "And God said, Let there be light: and there was light."
    (tmp_path / "q.jsonl").write_text(json.dumps({"text": text}) + "\n")
    one = build(
        IndexConfig(run_path=str(tmp_path / "one"), data=DataConfig(dataset=str(tmp_path / "q.jsonl")),
                    projection_dim=0, save_dtype="float32", whitening=str(ek), **common)
    )  # fmt: skip
    attr = Attributor(stores["train", True].root)
    assert all(isinstance(n, KfacWhitening) for n in attr.normalizers.values())
    ref_scores, ref_idx = attr.search(np.asarray(one.all), 3)
    model, tok = load_model(IndexConfig(run_path=str(tmp_path / "m"), **common))
    ids = torch.tensor([tok(text)["input_ids"]])
    with attr.trace(model, 3) as result:
        per_document_loss(model(ids).logits, ids).sum().backward()
    torch.testing.assert_close(
        result.scores, ref_scores, rtol=1e-4, atol=1e-6 * float(ref_scores.abs().max())
    )
    assert torch.equal(result.indices, ref_idx)
    proc = run_in_process(
        "build", str(tmp_path / "b"), "--model", str(model_dir), "--dataset", str(corpus_file),
        "--whitening", str(ek), "--optimizer_state", str(ek), check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "give one of the two" in proc.stderr and "Traceback" not in proc.stderr
