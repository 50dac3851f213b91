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

Both need every step's training state, which the script replays in memory (one training run of
the recipe, about 3 GB for the example model). Each document's contribution at a step is an
exact directional derivative of its token losses (a double backward through the step's
gradient). The LDS and leave-k-out correlations use the benchmark's subsets and its cached
retrains (``--cache_dir``; missing retrains are run).

    python -m benchmarks.quality.first_order [--run runs/quality_lm/run_bee8c4a5c0] [--modes unrolled final]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np


def step_derivatives(replay: Any, model: Any, params: dict[str, Any], t: int, cotangents: list[Any]) -> tuple:
    """The loss gradient of step ``t`` at ``params`` (the step's token mean, as training takes
    it), its loss-token count, the step's positions in the run's flat token layout, and for each
    cotangent ``c`` the per-token ``c . grad l_k`` at those positions (the double backward runs
    only when cotangents are given)."""
    import torch

    from bergson.methods.magic.replay import math_attention, token_losses

    batches = replay.micro_batches(t)
    tokens = sum(float(b.mask.sum()) for b in batches)
    grads: list[Any] | None = None
    per_token: list[list[Any]] = [[] for _ in cotangents]
    keys = list(params)
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
                (d,) = torch.autograd.grad(dot, c, retain_graph=j < len(cotangents) - 1)
                per_token[j].append((d.double() * tokens)[b.mask])
        g = [x.detach() for x in g]
        grads = g if grads is None else [a + x for a, x in zip(grads, g)]
    assert grads is not None
    positions = torch.cat([b.weight_index[b.mask] for b in batches])
    return dict(zip(keys, grads)), tokens, positions, [torch.cat(v) for v in per_token]


def first_order_scores(recipe_path: Path, modes: list[str]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
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
    out = {}
    for mode in modes:
        start = time.perf_counter()
        token_scores = [torch.zeros(replay.layout.size, dtype=torch.float64) for _ in range(nq)]
        if mode == "unrolled":  # cotangents of (weights, m, v) after the last step
            lams = [State(dict(qg), {n: {k: torch.zeros_like(v) for k, v in s.items()} for n, s in final.slots.items()}) for qg in q_grads]  # fmt: skip
        else:
            bc2 = 1 - recipe.training.beta2**total
            pre = {
                k: 1.0 / (torch.sqrt(final.slots["v"][k] / bc2) + recipe.training.eps) for k in final.params
            }
            directions = [{k: pre[k] * qg[k] for k in qg} for qg in q_grads]
        for t in tqdm(reversed(range(total)), desc=mode, unit="step", total=total):
            lr = learning_rate(recipe.training, t, total)
            if mode == "unrolled":
                state = states[t]
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
                _, tokens, positions, per_token = step_derivatives(replay, model, state.params, t, cots)
            else:
                cots = [{k: -lr * d[k] for k in d} for d in directions]  # dθ_T/dg_t ≈ -lr_t P_T
                offsets = [0.0] * nq  # (the step mean's own term, the same for every token, left out)
                _, tokens, positions, per_token = step_derivatives(replay, model, final.params, t, cots)
            for j in range(nq):
                # d(c . g_t)/dw_k = (c . grad l_k - c . g_t) / W_t, and a score is -dQ/dw
                token_scores[j][positions] -= (per_token[j] - offsets[j]) / tokens
        out[mode] = np.stack([replay.layout.per_document(s.numpy()) for s in token_scores], axis=1)
        seconds[mode] = time.perf_counter() - start
    return out, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--run", default="runs/quality_lm/run_bee8c4a5c0", help="the LM benchmark's run directory"
    )
    parser.add_argument("--cache_dir", default="runs/quality_lm/retrains")
    parser.add_argument("--modes", nargs="+", choices=["unrolled", "final"], default=["unrolled", "final"])
    parser.add_argument("--subsets", type=int, default=16)
    parser.add_argument("--fractions", type=float, nargs="*", default=[0.02, 0.05])
    args = parser.parse_args()

    import torch

    from bergson.methods.magic.command import load_recipe
    from bergson.validation import Retrainer, draw_subsets, score_correlations

    torch.manual_seed(0)
    recipe_path = Path(args.run) / "recipe.yaml"
    scores, seconds = first_order_scores(recipe_path, args.modes)
    retrainer = Retrainer(load_recipe(str(recipe_path)), args.cache_dir, "cpu")
    n = len(retrainer.docs)
    base = retrainer.query_losses(np.array([], np.int64))
    results: dict[str, dict[str, Any]] = {mode: {} for mode in args.modes}
    protocols = [("lds", 0.5, "lds_spearman")]
    protocols += [("leave_k_out", f, f"leave_{f * 100:g}pct_out_spearman") for f in args.fractions]
    for protocol, fraction, name in protocols:
        subsets = draw_subsets(n, protocol, fraction, args.subsets, 0)
        measured = np.stack([retrainer.query_losses(s) - base for s in subsets])
        for mode, s in scores.items():
            r = score_correlations(s, subsets, measured)
            results[mode][name] = round(float(r["mean_spearman"]), 3)
            results[mode][name + "_per_query"] = [round(float(p["spearman"]), 3) for p in r["per_query"]]
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
