"""The first-order trajectory scores of ``benchmarks/quality/first_order.py`` against ground truth.

Two AdamW steps over different documents, the first at learning rate 0 (the warmup's first
step): the weights do not move before the second step, so no Hessian enters the derivative of
the query loss with respect to the documents' weights, while the first step's gradient still
reaches the second update through both moments. The unrolled scores must then equal MAGIC's
exact metagradients. The final-weights scores must equal their definition, computed with plain
per-document autograd.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from benchmarks.quality import first_order, lm


def test_one_step_scores_equal_magic_and_their_definition(tmp_path):
    from bergson import load_gradients
    from bergson.methods.magic.command import load_recipe, magic, prepare
    from bergson.methods.magic.recipe import learning_rate
    from bergson.methods.magic.replay import Replay, query_gradient, token_losses

    args = lm.parse_args(["--quick", "--work", str(tmp_path)])
    args.docs, args.epochs = 16, 1  # two AdamW steps of 8 documents
    args.query_file, args.num_queries = lm.write_queries(args, tmp_path)
    recipe_path = lm.make_recipe(args, tmp_path)
    scores, seconds = first_order.first_order_scores(recipe_path, ["unrolled", "final"])
    assert set(seconds) == {"replay", "unrolled", "final"}

    recipe = load_recipe(str(recipe_path))
    magic(replace(recipe, run_path=str(tmp_path / "magic")))
    exact = np.asarray(load_gradients(str(tmp_path / "magic" / "scores"))["scores"], np.float64)
    assert exact.shape == scores["unrolled"].shape == (16, 2)
    scale = np.abs(exact).max()
    assert scale > 0
    np.testing.assert_allclose(scores["unrolled"], exact, rtol=0, atol=1e-4 * scale)

    # final: lr_t * grad l_i(theta_2) . P_2 grad Q(theta_2) / W_t, document by document
    model, tokenizer, docs, queries = prepare(recipe)
    replay = Replay(model, docs, recipe.training, tokenizer.pad_token_id or 0, progress=False)
    state, _ = replay.run()
    assert replay.num_steps == 2 and learning_rate(recipe.training, 0, 2) == 0
    # the first step's documents moved nothing themselves, yet count through the moments
    first = np.concatenate(replay.plan[0])
    assert np.abs(exact[first]).max() > 0.01 * scale
    bc2 = 1 - recipe.training.beta2**2
    pre = {k: 1.0 / (torch.sqrt(state.slots["v"][k] / bc2) + recipe.training.eps) for k in state.params}
    for t in range(2):
        step_docs = np.concatenate(replay.plan[t])
        tokens = float(docs.num_loss_tokens()[step_docs].sum())
        lr = learning_rate(recipe.training, t, 2)
        for j in range(2):
            qg = query_gradient(model, state.params, queries.select([j]))
            for i in step_docs:
                one = Replay(model, docs.select([i]), recipe.training, progress=False).micro_batches(0)[0]
                leaves = {k: v.detach().requires_grad_(True) for k, v in state.params.items()}
                loss = (token_losses(model, leaves, one.ids, one.target) * one.mask).sum()
                grads = torch.autograd.grad(loss, list(leaves.values()))
                want = lr * sum(float((g * pre[k] * qg[k]).sum()) for g, k in zip(grads, leaves)) / tokens
                tol = 1e-4 * np.abs(scores["final"][:, j]).max()
                assert abs(scores["final"][i, j] - want) <= tol, (t, i, j)
    assert np.abs(scores["final"]).max() > 0


def test_unrolled_curvature_modes_against_magic_and_the_exact_hessian(tmp_path):
    """Three AdamW steps, two of them with a nonzero learning rate, so the Hessian enters the
    metagradient: adding each step's exact Hessian-vector product to the weights' cotangent
    (``unrolled_exact``) must give MAGIC's scores, while dropping it (``unrolled``) must not.
    The Gauss-Newton products equal the Hessian's on the output head's block (the logits are
    linear in the head, so the two matrices agree there), and EK-FAC's products equal its dense
    Fisher's."""
    from bergson.methods.magic.command import load_recipe, magic, prepare
    from bergson.methods.magic.replay import Replay
    from bergson.store import load_gradients
    from bergson.transforms.ekfac import Factors, dense_fisher

    args = lm.parse_args(["--quick", "--work", str(tmp_path)])
    args.docs, args.epochs = 24, 1  # three AdamW steps of 8 documents
    args.query_file, args.num_queries = lm.write_queries(args, tmp_path)
    recipe_path = lm.make_recipe(args, tmp_path)
    scores, _ = first_order.first_order_scores(recipe_path, ["unrolled", "unrolled_exact"])
    recipe = load_recipe(str(recipe_path))
    magic(replace(recipe, run_path=str(tmp_path / "magic")))
    exact = np.asarray(load_gradients(str(tmp_path / "magic" / "scores"))["scores"], np.float64)
    scale = np.abs(exact).max()
    assert exact.shape == scores["unrolled_exact"].shape == (24, 2) and scale > 0
    np.testing.assert_allclose(scores["unrolled_exact"], exact, rtol=0, atol=1e-4 * scale)
    assert np.abs(scores["unrolled"] - exact).max() > 1e-2 * scale  # the Hessian's term matters here

    model, tokenizer, docs, _ = prepare(recipe)
    replay = Replay(model, docs, recipe.training, tokenizer.pad_token_id or 0, progress=False)
    state, _ = replay.run()
    gen = torch.Generator().manual_seed(0)
    head = "lm_head.weight"
    vector = {k: torch.zeros_like(v) for k, v in state.params.items()}
    vector[head] = torch.randn(vector[head].shape, generator=gen)
    hessian = first_order.step_derivatives(replay, model, state.params, 2, [vector], hvp=True)[4][0]
    (gn,) = first_order.gauss_newton_products(replay, model, state.params, 2, [vector])
    torch.testing.assert_close(
        gn[head], hessian[head], rtol=1e-3, atol=1e-4 * float(hessian[head].abs().max())
    )
    assert float(hessian[head].abs().max()) > 0

    # EK-FAC's products against its dense Fisher, on factors made up for one module
    qs, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    qa, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=torch.float64))
    lam = torch.rand(3, 4, generator=gen, dtype=torch.float64)
    eigen = Factors({"m": {"S_eigenvectors": qs, "A_eigenvectors": qa, "S_eigenvalues": torch.ones(3), "A_eigenvalues": torch.ones(4)}})  # fmt: skip
    eigen.save(tmp_path / "factors" / "eigen")
    Factors({"m": {"eigenvalues": lam}}).save(tmp_path / "factors" / "corrected")
    curvature = first_order.ekfac_curvature(tmp_path / "factors", 2.0)
    v = torch.randn(3, 4, generator=gen)
    got = first_order.ekfac_products(curvature, {"m.weight": v})["m.weight"]
    want = (dense_fisher(eigen, lam, "m") @ v.double().reshape(-1)).reshape(3, 4) / 2.0
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_sampled_fisher_is_the_gauss_newton_in_expectation(tmp_path):
    """Labels drawn from the model make each document's gradient outer product equal, in
    expectation, to its Gauss-Newton: the mean of (G . v)^2 over many draws matches
    v^T GN v computed exactly, and the Fisher's products are their definition."""
    from bergson.methods.magic.command import load_recipe, prepare
    from bergson.methods.magic.replay import Replay

    args = lm.parse_args(["--quick", "--work", str(tmp_path)])
    args.docs, args.epochs = 8, 1
    args.query_file, args.num_queries = lm.write_queries(args, tmp_path)
    recipe = load_recipe(str(lm.make_recipe(args, tmp_path)))
    model, tokenizer, docs, _ = prepare(recipe)
    one = docs.select([3])
    replay = Replay(model, one, recipe.training, tokenizer.pad_token_id or 0, progress=False)
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    names = ["gpt_neox.layers.0.mlp.dense_h_to_4h.weight", "gpt_neox.layers.1.attention.dense.weight"]
    gen = torch.Generator().manual_seed(1)
    vector = {
        k: torch.randn(v.shape, generator=gen) if k in names else torch.zeros_like(v)
        for k, v in params.items()
    }

    (gn,) = first_order.gauss_newton_products(replay, model, params, 0, [vector])  # per-token mean
    tokens = float(one.num_loss_tokens().sum())
    exact = tokens * sum(float((vector[k] * gn[k]).sum()) for k in params)

    fisher = first_order.sampled_fisher(model, params, one, recipe.training, names, draws=150)
    assert fisher[names[0]].shape == (150, *params[names[0]].shape)
    dots = torch.stack([torch.einsum("n...,...->n", fisher[k], vector[k]) for k in names]).sum(0)
    assert float((dots**2).mean()) == pytest.approx(exact, rel=0.4)  # 150 draws: about 12% standard error

    got = first_order.fisher_products(fisher, 0.5, vector)
    for k in names:
        want = 0.5 * torch.einsum("n,n...->...", dots, fisher[k]) / 150
        torch.testing.assert_close(got[k], want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
