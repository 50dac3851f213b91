"""Attribution quality on a small classifier: digits with logistic regression and an MLP.

Every method of the library, through its Python API for custom models and losses, is checked
against real retraining (see :mod:`benchmarks.quality.digits` for the setting):

* LDS: the linear datamodeling score: ``--lds_subsets`` random halves of the training set
  are removed, the model retrained on the rest, and each query's loss change is correlated
  (Spearman, over subsets) with the sum of the removed examples' scores; mean ± std over queries.
* leave-k-out: the same with random subsets of ``--lko_fraction`` of the training set.
* top-k removal: per method and query, the ``--topk_fraction`` highest-scored training examples
  are removed and the model retrained; the query's loss increase (mean over queries) next to
  that of removing as many random examples. Larger is better.
* agreement with the exact influence function (full Hessian; the ground-truth reference,
  computed for logistic regression, where it is cheap and the objective convex): Spearman
  over training examples per query, averaged.

The correlation statistics are bergson's own (:func:`bergson.validation.score_correlations`,
the function behind ``bergson validate``). Prints one JSON object and writes
``classifier.md``, ``classifier.json`` and ``classifier.png`` to ``--out_dir``.

    python -m benchmarks.quality.classifier [--lds_subsets 50] [--train_size 600] [--num_queries 20]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bergson.validation import correlations, draw_subsets, score_correlations

from . import digits as D
from .common import save_json

RESULTS = Path(__file__).resolve().parent / "results"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(D.MODELS), choices=D.MODELS)
    p.add_argument("--methods", nargs="+", default=list(D.METHODS), choices=D.METHODS)
    p.add_argument("--train_size", type=int, default=600, help="training examples (at most 1437)")
    p.add_argument("--num_queries", type=int, default=20, help="test examples used as queries")
    p.add_argument("--lds_subsets", type=int, default=50)
    p.add_argument("--lko_subsets", type=int, default=20)
    p.add_argument("--lko_fraction", type=float, default=0.05)
    p.add_argument("--topk_fraction", type=float, default=0.05)
    p.add_argument("--topk_queries", type=int, default=5, help="queries of the top-k removal test")
    p.add_argument("--steps", type=int, default=D.Recipe.steps, help="full-batch Adam steps")
    p.add_argument(
        "--projection_dim", type=int, default=16, help="of the gradient methods (0: exact gradients)"
    )
    D.add_fisher_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out_dir", default=str(RESULTS))
    return p.parse_args(argv)


def _summary(entry: dict[str, Any]) -> dict[str, float]:
    return {k: entry[k] for k in ("mean_spearman", "std_spearman", "mean_pearson")} | {
        "aggregate_spearman": entry["aggregate"]["spearman"]
    }


def evaluate(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    data = D.load_digits(args.seed, args.train_size)
    data.x_test, data.y_test = data.x_test[: args.num_queries], data.y_test[: args.num_queries]
    recipe = D.Recipe(steps=args.steps)
    model, moments = D.trained(kind, data, recipe, args.seed)
    t = time.perf_counter()
    D.trained(
        kind, data, recipe, args.seed
    )  # again, warm: one training run is the unit of each method's cost
    run_s = time.perf_counter() - t
    init = D.make_model(kind, args.seed)
    with torch.no_grad():
        full = D.loss_fn(model, (data.x_test, data.y_test)).numpy()
        accuracy = float((model(data.x_test).argmax(1) == data.y_test).double().mean())
    timings: dict[str, float] = {"train": time.perf_counter() - start}

    t = time.perf_counter()
    methods = tuple(m for m in args.methods if m != "exact_if" or kind == "logreg")
    D.method_scores(kind, model, moments, data, recipe, ("dot",), args.projection_dim, args.seed)  # warm-up
    method_s: dict[str, float] = {}
    scores = D.method_scores(
        kind,
        model,
        moments,
        data,
        recipe,
        methods,
        args.projection_dim,
        args.seed,
        method_s,
        args.fisher,
        args.fisher_samples,
    )
    timings["scores"] = time.perf_counter() - t

    t = time.perf_counter()
    n = len(data.x_train)
    base = D.retrain_losses(init, data, [np.array([], np.int64)], recipe)[0]
    assert np.allclose(base, full, rtol=1e-8, atol=1e-10), "retraining is not deterministic"
    lds_sets = draw_subsets(n, "lds", 0.5, args.lds_subsets, args.seed)
    lko_sets = draw_subsets(n, "leave_k_out", args.lko_fraction, args.lko_subsets, args.seed + 1)
    lds_delta = D.retrain_losses(init, data, lds_sets, recipe) - base
    lko_delta = D.retrain_losses(init, data, lko_sets, recipe) - base
    timings["retrain_subsets"] = time.perf_counter() - t

    t = time.perf_counter()
    k = max(1, round(args.topk_fraction * n))
    nq = min(args.topk_queries, args.num_queries)
    top_sets = [np.argsort(-s[:, q])[:k] for s in scores.values() for q in range(nq)]
    top_losses = D.retrain_losses(init, data, top_sets, recipe).reshape(len(scores), nq, -1)
    top_delta = {
        name: float(np.mean([top_losses[i, q, q] - base[q] for q in range(nq)]))
        for i, name in enumerate(scores)
    }
    random_sets = draw_subsets(n, "leave_k_out", k / n, args.lko_subsets, args.seed + 2)
    random_delta = D.retrain_losses(init, data, random_sets, recipe)[:, :nq] - base[:nq]
    timings["retrain_top_k"] = time.perf_counter() - t

    ref = scores.get("exact_if")
    results: dict[str, Any] = {}
    for name, s in scores.items():
        entry: dict[str, Any] = {
            "lds": _summary(score_correlations(s, lds_sets, lds_delta)),
            "leave_k_out": _summary(score_correlations(s, lko_sets, lko_delta)),
            "top_k_loss_increase": top_delta[name],
            "seconds": round(method_s[name], 3),
            "training_runs": round(method_s[name] / run_s, 2),
        }
        if ref is not None:
            entry["spearman_vs_exact_if"] = float(
                np.nanmean([correlations(ref[:, q], s[:, q])["spearman"] for q in range(s.shape[1])])
            )
        results[name] = entry
    return {
        "model": kind,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_examples": n,
        "queries": len(data.x_test),
        "test_accuracy_on_queries": accuracy,
        "removed_top_k": k,
        "random_k_loss_increase": float(random_delta.mean()),
        "methods": results,
        "seconds": {key: round(v, 2) for key, v in timings.items()},
        "training_run_s": round(run_s, 3),
    }


def _fmt(entry: dict[str, float]) -> str:
    return f"{entry['mean_spearman']:.3f} ± {entry['std_spearman']:.3f}"


def write_markdown(report: dict[str, Any], path: Path) -> None:
    models = report["models"]
    lines = [
        "# Attribution quality on digits (logistic regression, MLP)",
        "",
        f"Command: `{report['command']}` (wall {report['wall_seconds']:.0f} s on {report['machine']}).",
        "",
        "LDS and leave-k-out: Spearman correlation, over retrained subsets, between each query's "
        "measured loss change and the summed scores of the removed examples; mean ± std over queries. "
        "Top-k: mean increase of a query's loss after removing its top-scored examples (random removal "
        "of as many examples for comparison). vs IF: Spearman with the exact influence function.",
        "",
    ]
    for kind, res in models.items():
        lines += [
            f"## {kind} ({res['parameters']} parameters, {res['train_examples']} training examples, "
            f"{res['queries']} queries, accuracy {res['test_accuracy_on_queries']:.3f})",
            "",
            f"| method | LDS | leave-k-out | top-{res['removed_top_k']} loss increase | vs exact IF | "
            f"cost (training runs of {res['training_run_s']:.2f} s) |",
            "|---|---|---|---|---|---|",
        ]
        for name, m in res["methods"].items():
            vs = m.get("spearman_vs_exact_if")
            lines.append(
                f"| {D.LABELS[name]} | {_fmt(m['lds'])} | {_fmt(m['leave_k_out'])} | "
                f"{m['top_k_loss_increase']:+.4f} | {'' if vs is None else f'{vs:.3f}'} | "
                f"{m['training_runs']:.2f} |"
            )
        lines += [f"| random removal | | | {res['random_k_loss_increase']:+.4f} | | |", ""]
    path.write_text("\n".join(lines))


def write_plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(report["models"])
    methods = [m for m in D.METHODS if any(m in r["methods"] for r in report["models"].values())]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    width = 0.8 / len(models)
    x = np.arange(len(methods))
    for ax, key, title in zip(
        axes, ("lds", "leave_k_out"), ("LDS (random halves)", "leave-k-out (random k)")
    ):
        for i, kind in enumerate(models):
            res = report["models"][kind]["methods"]
            means = [res[m][key]["mean_spearman"] if m in res else np.nan for m in methods]
            stds = [res[m][key]["std_spearman"] if m in res else np.nan for m in methods]
            ax.bar(x + i * width, means, width, yerr=stds, capsize=2, label=kind)
        ax.set_xticks(
            x + width * (len(models) - 1) / 2, [D.LABELS[m] for m in methods], rotation=35, ha="right"
        )
        ax.set_title(title)
        ax.axhline(0, color="black", linewidth=0.5)
    axes[0].set_ylabel("Spearman (mean ± std over queries)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    D.check_fisher_args(args)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.perf_counter()
    report: dict[str, Any] = {
        **D.run_header("classifier", args, argv),
        "models": {kind: evaluate(kind, args) for kind in args.models},
    }
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    out = save_json(Path(args.out_dir), "classifier", report)
    write_markdown(report, out / "classifier.md")
    write_plot(report, out / "classifier.png")
    from .choose import refresh

    refresh(out)
    return report


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
