"""Does the training trajectory without curvature explain retraining? Two first-order scores.

On the LM quality benchmark's fine-tune (``benchmarks.quality.lm``: 240 documents, 8 epochs of
AdamW), MAGIC, which differentiates exactly through every step, reaches an LDS Spearman of about
0.8, and EK-FAC, which models the curvature at the final weights only, about 0.45. This script
asks how much of MAGIC's lead comes from following AdamW's trajectory rather than from the
curvature along it, with two scores that keep the trajectory and drop the Hessian:

* ``unrolled``: reverse-mode differentiation through the whole run in which each step's gradient
  is held fixed in the weights (no Hessian-vector products). The cotangents of the weights and of
  AdamW's two moments flow back through the optimizer's updates alone; a document's score is the
  sum, over the steps that train on it, of the step gradient's cotangent times the document's
  gradient at that step (``-dQ/dw``, as MAGIC's, with the same token-weight convention).
* ``final``: the same without the optimizer's state: every appearance of a document contributes
  ``lr_t * g_i(theta_T) . P_T grad Q(theta_T) / W_t``, its gradient at the final weights, AdamW's
  final preconditioner ``P_T = 1 / (sqrt(v_hat_T) + eps)`` and the step's learning rate
  (``W_t``: the step's loss tokens).

Four more ``unrolled`` modes put a curvature term back: each step's ``d g_t / d theta_t``
contributes ``H c`` to the weights' cotangent, for the step gradient's cotangent ``c``, with H

* ``unrolled_exact``: the exact Hessian of the step's batch at the step's own weights (this is
  MAGIC's metagradient, computed another way: a check of the construction);
* ``unrolled_final_hvp``: the exact Hessian of the step's batch at the final weights;
* ``unrolled_final_gn``: the exact Gauss-Newton of the step's batch at the final weights;
* ``unrolled_final_gn_other``: the same for another batch of the same epoch (none of the step's
  documents), half an epoch away;
* ``unrolled_all_final``: ``unrolled_final_gn`` with the documents' gradients taken at the final
  weights too;
* ``unrolled_final_state``: ``unrolled_all_final`` with AdamW's updates differentiated at the final
  state as well (the final weights, their step gradients and the final moments at every step), so
  that nothing of the trajectory is used but the order of the batches and the learning rates;
* ``unrolled_fisher``: ``unrolled_final_state`` with H the Fisher of per-document gradients under
  labels drawn from the model (``--fisher_draws`` per document), the matrix EK-FAC factorises but
  kept whole, on the weights EK-FAC models (none for the rest);
* ``unrolled_ekfac``: EK-FAC's Gauss-Newton at the final weights (``--ekfac_dir``, by default the
  benchmark's own factors), for the weights it models, and none for the rest.

The documents' contributions stay at each step's own weights in every unrolled mode but
``unrolled_all_final``, ``unrolled_final_state`` and ``unrolled_fisher``.

``--curvature_check`` prints, instead of scores, how EK-FAC's and K-FAC's Gauss-Newton compare
with the exact one along each query's gradient (:func:`curvature_along_queries`).

Every mode needs every step's training state, which the script replays in memory (one training run of
the recipe, about 3 GB for the example model). Each document's contribution at a step is an
exact directional derivative of its token losses (a double backward through the step's
gradient). The LDS and leave-k-out correlations use the benchmark's subsets and its cached
retrains (``--cache_dir``; missing retrains are run).

    python -m benchmarks.quality.first_order [--run runs/quality_lm/run_bee8c4a5c0] [--modes unrolled final]
        [--ekfac_dir DIR]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

# the unrolled modes that take the documents' gradients, and AdamW's derivatives, at the final state
DOCUMENTS_AT_FINAL = ("unrolled_all_final", "unrolled_final_state", "unrolled_fisher")
OPTIMIZER_AT_FINAL = ("unrolled_final_state", "unrolled_fisher")


def step_derivatives(
    replay: Any, model: Any, params: dict[str, Any], t: int, cotangents: list[Any], hvp: bool = False
) -> tuple:
    """The loss gradient of step ``t`` at ``params`` (the step's token mean, as training takes
    it), its loss-token count, the step's positions in the run's flat token layout, for each
    cotangent ``c`` the per-token ``c . grad l_k`` at those positions (the double backward runs
    only when cotangents are given), and with ``hvp`` each ``H_t c`` (the step loss's Hessian at
    ``params`` times ``c``, from the same double backward)."""
    import torch

    from bergson.methods.magic.replay import math_attention, token_losses

    batches = replay.micro_batches(t)
    tokens = sum(float(b.mask.sum()) for b in batches)
    grads: list[Any] | None = None
    per_token: list[list[Any]] = [[] for _ in cotangents]
    keys = list(params)
    hvps: list[dict[str, Any]] = (
        [{k: torch.zeros_like(v) for k, v in params.items()} for _ in cotangents] if hvp else []
    )
    for b in batches:
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        c = torch.ones(b.ids.shape, dtype=torch.float32, requires_grad=bool(cotangents))
        with torch.enable_grad(), math_attention():
            losses = token_losses(model, leaves, b.ids, b.target) * b.mask
            g = torch.autograd.grad(
                (losses * c).sum() / tokens, [leaves[k] for k in keys], create_graph=bool(cotangents)
            )
            for j, cot in enumerate(cotangents):
                dot = torch.stack([(gi * cot[k]).sum() for gi, k in zip(g, keys)]).sum()
                inputs = [c, *(leaves[k] for k in keys)] if hvp else [c]
                got = torch.autograd.grad(
                    dot, inputs, retain_graph=j < len(cotangents) - 1, allow_unused=True
                )
                per_token[j].append((got[0].double() * tokens)[b.mask])
                for k, h in zip(keys, got[1:]):
                    if h is not None:
                        hvps[j][k] += h
        g = [x.detach() for x in g]
        grads = g if grads is None else [a + x for a, x in zip(grads, g)]
    assert grads is not None
    positions = torch.cat([b.weight_index[b.mask] for b in batches])
    return dict(zip(keys, grads)), tokens, positions, [torch.cat(v) for v in per_token], hvps


def ekfac_curvature(path: Path, tokens_per_document: float) -> dict[str, tuple[Any, Any, Any]]:
    """EK-FAC's factors from ``bergson ekfac`` (its ``eigen`` and ``corrected`` stages), per
    tracked weight: (Q_S, corrected eigenvalues, Q_A), with the eigenvalues divided by the mean
    number of loss tokens per document. EK-FAC models the Fisher of a document's summed token
    losses, (1/N) sum_n G_n G_n^T; a training step takes the mean over its tokens, whose
    Gauss-Newton is that Fisher over the tokens per document."""
    from bergson.transforms.ekfac import Factors

    eigen, corrected = Factors.load(path / "eigen"), Factors.load(path / "corrected")
    return {
        f"{m}.weight": (
            eigen.tensors[m]["S_eigenvectors"].float(),
            corrected.tensors[m]["eigenvalues"].float() / tokens_per_document,
            eigen.tensors[m]["A_eigenvectors"].float(),
        )
        for m in corrected.tensors
    }


def ekfac_products(curvature: dict[str, tuple[Any, Any, Any]], vector: dict[str, Any]) -> dict[str, Any]:
    """EK-FAC's Gauss-Newton times ``vector`` on the weights it models (Q_S [(Q_S^T V Q_A) * L]
    Q_A^T); the other parameters get no curvature term."""
    return {k: qs @ ((qs.T @ vector[k] @ qa) * lam) @ qa.T for k, (qs, lam, qa) in curvature.items()}


def gauss_newton_products(
    replay: Any, model: Any, params: dict[str, Any], t: int, vectors: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The exact Gauss-Newton of step ``t``'s mean token loss at ``params`` times each vector:
    J^T H_z J v, with J the logits' Jacobian and H_z = diag(p) - p p^T the softmax cross-entropy's
    Hessian in the logits, per loss token (``bergson unroll``'s products on the step's batches)."""
    from bergson.methods.magic.unroll import gauss_newton_products as products

    return products(model, params, replay.micro_batches(t), vectors)


def sampled_fisher(
    model: Any, params: dict[str, Any], docs: Any, training: Any, names: list[str], draws: int, seed: int = 0
) -> dict[str, Any]:
    """Per-document gradients of the summed token losses at ``params`` under labels drawn from
    the model itself (``draws`` per document, seeded), on the weights ``names``: [N * draws, ...]
    per weight. Their mean outer product over the documents is the Fisher EK-FAC factorises,
    unfactorised and with its blocks between weight matrices kept."""
    import torch
    from torch.func import functional_call

    from bergson.methods.magic.replay import Replay, math_attention

    gen = torch.Generator().manual_seed(seed)
    out: dict[str, list[Any]] = {k: [] for k in names}
    for i in range(len(docs)):
        one = Replay(model, docs.select([i]), training, progress=False).micro_batches(0)[0]
        leaves = {k: v.detach().requires_grad_(k in names) for k, v in params.items()}
        with torch.enable_grad(), math_attention():
            logits = functional_call(model, leaves, (one.ids,), {"use_cache": False}).logits.float()
            logp = torch.log_softmax(logits, -1).reshape(-1, logits.shape[-1])
            for _ in range(draws):
                labels = torch.multinomial(logp.detach().exp(), 1, generator=gen)
                picked = logp.gather(1, labels).reshape(one.mask.shape)
                loss = -(picked * one.mask).sum()
                grads = torch.autograd.grad(loss, [leaves[k] for k in names], retain_graph=True)
                for k, g in zip(names, grads):
                    out[k].append(g.detach())
    return {k: torch.stack(v) for k, v in out.items()}


def fisher_products(fisher: dict[str, Any], scale: float, vector: dict[str, Any]) -> dict[str, Any]:
    """``scale * mean_n G_n (G_n . v)`` over the rows of :func:`sampled_fisher`'s gradients."""
    import torch

    dots = sum(torch.einsum("n...,...->n", g, vector[k]) for k, g in fisher.items())
    rows = next(iter(fisher.values())).shape[0]
    return {k: torch.tensordot(dots * (scale / rows), g, dims=1) for k, g in fisher.items()}


def first_order_scores(
    recipe_path: Path,
    modes: list[str],
    ekfac_dir: Path | None = None,
    ekfac_scale: float = 1.0,
    fisher_draws: int = 1,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    import torch
    from tqdm import tqdm

    from bergson.methods.magic.command import load_recipe, prepare
    from bergson.methods.magic.recipe import State, learning_rate, optimizer_update
    from bergson.methods.magic.replay import Replay, math_attention, query_gradient

    recipe = load_recipe(str(recipe_path))
    if recipe.training.optimizer != "adamw":
        raise SystemExit("the first-order scores follow AdamW's updates: the recipe must train with adamw")
    model, tokenizer, docs, queries = prepare(recipe)
    pad = tokenizer.pad_token_id or 0
    replay = Replay(model, docs, recipe.training, pad, progress=False)
    total, seconds = replay.num_steps, {}
    start = time.perf_counter()
    states = [replay.initial_state()]
    with math_attention():
        for t in tqdm(range(total), desc="replay", unit="step"):
            states.append(replay.step(states[-1], t, replay.ones())[0].detached())
    seconds["replay"] = time.perf_counter() - start
    final = states[-1]
    nq = len(queries)
    q_grads = [
        {k: v.detach() for k, v in query_gradient(model, final.params, queries.select([j]), pad).items()}
        for j in range(nq)
    ]
    curvature = {}
    fisher: dict[str, Any] = {}
    if "unrolled_fisher" in modes:
        if ekfac_dir is None:
            raise SystemExit("unrolled_fisher models the weights of the run's EK-FAC factors (bergson ekfac)")
        start = time.perf_counter()
        from bergson.transforms.ekfac import Factors

        names = [f"{m}.weight" for m in Factors.names(ekfac_dir / "corrected")]  # the header alone
        fisher = sampled_fisher(model, final.params, docs, recipe.training, names, fisher_draws)
        seconds["fisher"] = time.perf_counter() - start
    if "unrolled_ekfac" in modes:
        if ekfac_dir is None:
            raise SystemExit("unrolled_ekfac needs the run's EK-FAC factors (bergson ekfac)")
        curvature = ekfac_curvature(ekfac_dir, replay.layout.size / len(docs) / ekfac_scale)
    out = {}
    for mode in modes:
        start = time.perf_counter()
        token_scores = [torch.zeros(replay.layout.size, dtype=torch.float64) for _ in range(nq)]
        unrolled = mode.startswith("unrolled")
        if unrolled:  # cotangents of (weights, m, v) after the last step
            lams = [State(dict(qg), {n: {k: torch.zeros_like(v) for k, v in s.items()} for n, s in final.slots.items()}) for qg in q_grads]  # fmt: skip
        else:
            bc2 = 1 - recipe.training.beta2**total
            pre = {
                k: 1.0 / (torch.sqrt(final.slots["v"][k] / bc2) + recipe.training.eps) for k in final.params
            }
            directions = [{k: pre[k] * qg[k] for k in qg} for qg in q_grads]
        for t in tqdm(reversed(range(total)), desc=mode, unit="step", total=total):
            lr = learning_rate(recipe.training, t, total)
            if unrolled:
                state = final if mode in OPTIMIZER_AT_FINAL else states[t]
                g = step_derivatives(replay, model, state.params, t, [])[0]
                cots, offsets = [], []
                for j in range(nq):
                    leaf = state.detached(requires_grad=True)
                    gl = {k: v.detach().requires_grad_(True) for k, v in g.items()}
                    with torch.enable_grad():
                        new = optimizer_update(recipe.training, leaf, gl, t, lr)
                        got = torch.autograd.grad(
                            new.tensors(), [*leaf.tensors(), *gl.values()], lams[j].tensors()
                        )
                    n = len(leaf.tensors())
                    lams[j] = leaf.like([x.detach() for x in got[:n]])
                    cot = {k: x.detach() for k, x in zip(gl, got[n:])}
                    cots.append(cot)
                    offsets.append(float(sum((cot[k] * g[k]).sum() for k in g)))
                exact = mode == "unrolled_exact"
                at_final = mode in DOCUMENTS_AT_FINAL
                g_docs, tokens, positions, per_token, hvps = step_derivatives(
                    replay, model, final.params if at_final else state.params, t, cots, hvp=exact
                )
                if at_final and state is not final:  # (at the final state, g above is this gradient)
                    offsets = [float(sum((cot[k] * g_docs[k]).sum() for k in g_docs)) for cot in cots]
                if mode == "unrolled_final_hvp":
                    hvps = step_derivatives(replay, model, final.params, t, cots, hvp=True)[4]
                elif mode in ("unrolled_final_gn", "unrolled_all_final", "unrolled_final_state"):
                    hvps = gauss_newton_products(replay, model, final.params, t, cots)
                elif mode == "unrolled_final_gn_other":  # another step of the same epoch: other documents
                    per_epoch = total // recipe.training.epochs
                    first = t - t % per_epoch
                    other = first + (t - first + per_epoch // 2) % per_epoch
                    hvps = gauss_newton_products(replay, model, final.params, other, cots)
                elif mode == "unrolled_fisher":
                    hvps = [fisher_products(fisher, len(docs) / replay.layout.size, cot) for cot in cots]
                elif mode == "unrolled_ekfac":
                    hvps = [ekfac_products(curvature, cot) for cot in cots]
                for lam, h in zip(lams, hvps):  # d g_t / d theta_t = H_t: the curvature's term
                    for k, x in h.items():
                        lam.params[k] += x
            else:
                cots = [{k: -lr * d[k] for k in d} for d in directions]  # dθ_T/dg_t ≈ -lr_t P_T
                offsets = [0.0] * nq  # (the step mean's own term, the same for every token, left out)
                _, tokens, positions, per_token, _ = step_derivatives(replay, model, final.params, t, cots)
            for j in range(nq):
                # d(c . g_t)/dw_k = (c . grad l_k - c . g_t) / W_t, and a score is -dQ/dw
                token_scores[j][positions] -= (per_token[j] - offsets[j]) / tokens
        out[mode] = np.stack([replay.layout.per_document(s.numpy()) for s in token_scores], axis=1)
        seconds[mode] = time.perf_counter() - start
    return out, seconds


def curvature_along_queries(recipe_path: Path, ekfac_dir: Path, directions: int = 2) -> dict[str, Any]:
    """How EK-FAC's and K-FAC's Gauss-Newton compare with the exact one along each query's
    gradient q (on the weights EK-FAC models): q^T F q for each, the exact Gauss-Newton taken as
    the mean over the last epoch's batches at the final weights (the corpus, once), the factors'
    per-document Fisher divided by the mean loss tokens per document; the share of the exact
    form that lies within the modules' diagonal blocks; and the same ratio along random
    directions."""
    import torch

    from bergson.methods.magic.command import load_recipe, prepare
    from bergson.methods.magic.replay import Replay, query_gradient
    from bergson.transforms.ekfac import Factors

    recipe = load_recipe(str(recipe_path))
    model, tokenizer, docs, queries = prepare(recipe)
    pad = tokenizer.pad_token_id or 0
    replay = Replay(model, docs, recipe.training, pad, progress=False)
    final, _ = replay.run()
    per_doc = float(docs.num_loss_tokens().sum()) / len(docs)
    ekfac = ekfac_curvature(ekfac_dir, per_doc)
    eigen = Factors.load(ekfac_dir / "eigen").tensors
    kfac = {
        f"{m}.weight": (
            d["S_eigenvectors"].float(),
            torch.outer(d["S_eigenvalues"], d["A_eigenvalues"]).float() / per_doc,
            d["A_eigenvectors"].float(),
        )
        for m, d in eigen.items()
    }
    names = list(ekfac)
    gen = torch.Generator().manual_seed(0)

    def on_modelled(values: dict[str, Any]) -> dict[str, Any]:
        return {k: values[k] if k in ekfac else torch.zeros_like(v) for k, v in final.params.items()}

    vectors = [on_modelled(query_gradient(model, final.params, queries.select([j]), pad)) for j in range(len(queries))]  # fmt: skip
    vectors += [on_modelled({k: torch.randn(v.shape, generator=gen) for k, v in final.params.items()}) for _ in range(directions)]  # fmt: skip
    blocks = [{k: (v[k] if k == b else torch.zeros_like(v[k])) for k in v} for v in vectors for b in names]
    per_epoch = replay.num_steps // recipe.training.epochs
    last = range(replay.num_steps - per_epoch, replay.num_steps)
    full, within = [0.0] * len(vectors), [0.0] * len(vectors)
    for t in last:
        products = gauss_newton_products(replay, model, final.params, t, vectors + blocks)
        for i, v in enumerate(vectors):
            full[i] += sum(float((v[k] * products[i][k]).sum()) for k in names) / per_epoch
        for i, b in enumerate(blocks):
            k = names[i % len(names)]
            within[i // len(names)] += float((b[k] * products[len(vectors) + i][k]).sum()) / per_epoch

    def form(curvature: dict[str, Any], v: dict[str, Any]) -> float:
        products = ekfac_products(curvature, v)
        return sum(float((v[k] * products[k]).sum()) for k in names)

    rows = []
    for i, v in enumerate(vectors):
        rows.append(
            {
                "direction": f"query {i}" if i < len(queries) else f"random {i - len(queries)}",
                "exact_gauss_newton": round(full[i], 4),
                "within_blocks_share": round(within[i] / full[i], 3),
                "ekfac_over_exact": round(form(ekfac, v) / full[i], 3),
                "kfac_over_exact": round(form(kfac, v) / full[i], 3),
                "ekfac_over_exact_within_blocks": round(form(ekfac, v) / within[i], 3),
            }
        )
    return {"loss_tokens_per_document": round(per_doc, 2), "directions": rows}


def correlations(
    run: Path, cache_dir: str, scores: dict[str, np.ndarray], subsets: int, fractions: list[float]
) -> dict[str, dict[str, Any]]:
    """Each score array's LDS and leave-k-out Spearman (mean and per query) against the LM
    benchmark's retrains of ``run`` (cached under ``cache_dir``; missing ones are run)."""
    from bergson.methods.magic.command import load_recipe
    from bergson.validation import Retrainer, draw_subsets, score_correlations

    retrainer = Retrainer(load_recipe(str(run / "recipe.yaml")), cache_dir, "cpu")
    n = len(retrainer.docs)
    base = retrainer.query_losses(np.array([], np.int64))
    results: dict[str, dict[str, Any]] = {name: {} for name in scores}
    protocols = [("lds", 0.5, "lds_spearman")]
    protocols += [("leave_k_out", f, f"leave_{f * 100:g}pct_out_spearman") for f in fractions]
    for protocol, fraction, name in protocols:
        drawn = draw_subsets(n, protocol, fraction, subsets, 0)
        measured = np.stack([retrainer.query_losses(s) - base for s in drawn])
        for mode, s in scores.items():
            r = score_correlations(s, drawn, measured)
            results[mode][name] = round(float(r["mean_spearman"]), 3)
            results[mode][name + "_per_query"] = [round(float(p["spearman"]), 3) for p in r["per_query"]]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--run", default="runs/quality_lm/run_bee8c4a5c0", help="the LM benchmark's run directory"
    )
    parser.add_argument("--cache_dir", default="runs/quality_lm/retrains")
    parser.add_argument(
        "--ekfac_scale",
        type=float,
        default=1.0,
        help="multiply EK-FAC's curvature by this in unrolled_ekfac (a calibration experiment)",
    )
    parser.add_argument(
        "--fisher_draws", type=int, default=1, help="label draws per document in unrolled_fisher"
    )
    parser.add_argument(
        "--ekfac_dir",
        default=None,
        help="the EK-FAC factors unrolled_ekfac uses (default: RUN/ekfac, the benchmark's own)",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=[
            "unrolled",
            "final",
            "unrolled_exact",
            "unrolled_final_hvp",
            "unrolled_final_gn",
            "unrolled_final_gn_other",
            "unrolled_all_final",
            "unrolled_final_state",
            "unrolled_fisher",
            "unrolled_ekfac",
        ],
        default=["unrolled", "final"],
    )
    parser.add_argument("--subsets", type=int, default=16)
    parser.add_argument("--fractions", type=float, nargs="*", default=[0.02, 0.05])
    parser.add_argument(
        "--curvature_check",
        action="store_true",
        help="instead of scores: EK-FAC's and K-FAC's Gauss-Newton against the exact one along the queries",
    )
    args = parser.parse_args()
    ekfac_dir = Path(args.ekfac_dir or Path(args.run) / "ekfac")
    if args.curvature_check:
        check = curvature_along_queries(Path(args.run) / "recipe.yaml", ekfac_dir)
        print(json.dumps({"workload": args.run, "curvature": check}, indent=2))
        return

    import torch

    torch.manual_seed(0)
    recipe_path = Path(args.run) / "recipe.yaml"
    scores, seconds = first_order_scores(
        recipe_path, args.modes, ekfac_dir, args.ekfac_scale, args.fisher_draws
    )
    results = correlations(Path(args.run), args.cache_dir, scores, args.subsets, args.fractions)
    print(
        json.dumps(
            {
                "workload": args.run,
                "scores": results,
                "seconds": {k: round(v, 1) for k, v in seconds.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
