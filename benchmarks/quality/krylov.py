"""``bergson unroll``'s two knobs against retraining, on the LM benchmark's fine-tune.

``bergson unroll`` (:mod:`bergson.methods.magic.unroll`) approximates MAGIC's reverse pass at the
final state: the run's batch order and learning rates, AdamW linearised at its final moments,
and the exact Gauss-Newton of ``--curvature_docs`` documents at the final weights, applied in
a ``--krylov_steps``-dimensional Krylov subspace per query. This script scores the benchmark's
five queries for every combination of the two knobs (and of the seed that draws the documents)
and reports the LDS and leave-k-out Spearman of each with its seconds, against the same cached
retrains as ``benchmarks.quality.lm``:

    python -m benchmarks.quality.lm    # the run, its checkpoint (with optimizer.pt) and retrains, first
    python -m benchmarks.quality.krylov [--krylov 8 16] [--sample 8 16] [--seeds 0 1] [--spaces per_column shared] [--orders 0 1 2]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np


def sweep(
    run: Path,
    steps: list[int],
    samples: list[int],
    seeds: list[int],
    spaces: list[str],
    orders: list[int] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, float]], list[float]]:
    """Scores [documents, queries] and stage seconds per setting ``{space}_m{docs}_k{steps}_s{seed}``,
    and the seconds of plain training runs of the recipe interleaved with them (one before the sweep
    and one after each setting's draws), so that costs are ratios measured under the same load.

    ``orders``: data-order seeds handed to unroll instead of the recipe's (the settings' names then
    end in ``_o{seed}``), to measure what a batch order other than the run's (a run trained
    elsewhere) costs; None: the recipe's own."""
    from bergson.config import UnrollConfig
    from bergson.methods.magic.command import load_recipe, prepare
    from bergson.methods.magic.replay import Replay
    from bergson.methods.magic.unroll import unroll_scores

    recipe = load_recipe(str(run / "recipe.yaml"))
    checkpoint = run / "checkpoint"
    model, tokenizer, docs, queries = prepare(replace(recipe, model=str(checkpoint)))
    pad = tokenizer.pad_token_id or 0
    columns = [queries.select([j]) for j in range(len(queries))]
    scores: dict[str, np.ndarray] = {}
    seconds: dict[str, dict[str, float]] = {}
    runs: list[float] = []

    def training_run() -> None:  # what one retrain of the benchmark does, in this process
        start = time.perf_counter()
        Replay(model, docs, recipe.training, pad, progress=False).run()
        runs.append(round(time.perf_counter() - start, 2))

    training_run()
    own = recipe.training.seed
    for order, space, m, k, seed in itertools.product(orders or [own], spaces, samples, steps, seeds):
        cfg = UnrollConfig(
            model=str(checkpoint), data=recipe.data, query=recipe.query,
            training=replace(recipe.training, seed=order),
            krylov_steps=k, curvature_docs=m, curvature_seed=seed, krylov_space=space,  # type: ignore[arg-type]
        )  # fmt: skip
        name = f"{space}_m{m}_k{k}_s{seed}" + ("" if order == own else f"_o{order}")
        start = time.perf_counter()
        scores[name], took = unroll_scores(model, docs, columns, cfg, pad, progress=False)
        seconds[name] = {**{s: round(v, 2) for s, v in took.items()}, "total_s": round(time.perf_counter() - start, 2)}  # fmt: skip
        if seed == seeds[-1]:
            training_run()
    return scores, seconds, runs


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--run", default="runs/quality_lm/run_bee8c4a5c0", help="the LM benchmark's run directory"
    )
    parser.add_argument("--cache_dir", default="runs/quality_lm/retrains")
    parser.add_argument("--krylov", type=int, nargs="+", default=[8, 16], help="Lanczos steps per query")
    parser.add_argument(
        "--sample", type=int, nargs="+", default=[8, 16], help="documents in the Gauss-Newton"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="draws of those documents")
    parser.add_argument("--spaces", nargs="+", default=["per_column"], choices=["per_column", "shared"])
    parser.add_argument(
        "--orders", type=int, nargs="+", default=None, help="data-order seeds instead of the recipe's"
    )
    parser.add_argument("--subsets", type=int, default=16)
    parser.add_argument("--fractions", type=float, nargs="*", default=[0.02, 0.05])
    args = parser.parse_args()

    import torch

    from .first_order import correlations

    torch.manual_seed(0)
    scores, seconds, runs = sweep(
        Path(args.run), args.krylov, args.sample, args.seeds, args.spaces, args.orders
    )
    results: dict[str, Any] = correlations(
        Path(args.run), args.cache_dir, scores, args.subsets, args.fractions
    )
    run_s = float(np.median(runs))
    for name in results:
        results[name]["seconds"] = seconds[name]
        results[name]["training_runs"] = round(seconds[name]["total_s"] / run_s, 2)
    out = {"workload": args.run, "training_run_s": runs, "settings": results}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
