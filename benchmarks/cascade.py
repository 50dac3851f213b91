"""The retrieve-then-rescore cascade on the LM quality benchmark's workload.

How much of EK-FAC's own top-10 per query the cascade recovers (recall@10) when it rescores only
the candidates of a cheap first stage, against the fraction of the corpus rescored, and its
scoring time against full EK-FAC scoring, measured in the same run.

The workload is ``benchmarks/quality/lm.py``'s cached run directory (``--run``): a fine-tuned tiny
Pythia, 240 training documents, 5 queries, and its stores: two cheap first stages (``scores_dot``
and ``scores_cosine_opt``: dot products and optimizer-normalized cosines of projected gradients) and
the full EK-FAC run (``ekfac/``). A third first stage is made here: EK-FAC's preconditioned queries
projected like the projected training store ``train/`` (``bergson ekfac --projected_queries``),
scored against it (``bergson score --index train``) — a projected approximation of EK-FAC itself.
A fourth to sixth: the training and query stores rebuilt with ``--whitening`` (K-FAC's damped
S^-1/2 G A^-1/2 from the same EK-FAC fit, folded into the projections) at p = 32, 64 and 96, scored
by dot product: projected K-FAC influence with the square root of the inverse on each side. The
cascade runs through
:func:`bergson.methods.cascade.cascade`, exactly as ``bergson score --candidates ... --method
ekfac`` does, with EK-FAC's own options (``ekfac/ekfac.yaml``); its curvature and query products
are the full run's (copied, as a resumed run reads them: the cascade fits them on the whole corpus
either way), so each cascade runs only its scoring pass, as does the full-scoring leg it is timed
against.

For each fraction f, k = f x rows candidates per query; the rows rescored are their union over the
queries (reported as fraction_rescored). Timings alternate the legs (full, cascade,
full, cascade, ...) and report the best of ``--repeats``, with the 1-minute load average.

    python -m benchmarks.cascade [--run runs/quality_lm/run_bee8c4a5c0] [--work runs/cascade_bench]
    python -m benchmarks.cascade --corpus_rows 1500 --work runs/cascade_bench_1500   # the whole shipped corpus

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np

SOURCES = ("scores_dot", "scores_cosine_opt", "ekfac_projected")
WHITENED = (32, 64, 96)
"""Projection dims of the K-FAC-whitened first stages (``build --whitening``)."""
WHITENING_DAMPING = 0.01
"""Their ``--whitening_damping`` (the default), given: a stored config.yaml may hold another."""
FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
STAGES = ("covariances", "eigen", "corrected", "queries")


def top(scores: np.ndarray, k: int) -> list[np.ndarray]:
    return [np.argsort(-scores[:, c], kind="stable")[:k] for c in range(scores.shape[1])]


def fresh(work: Path, name: str, run: Path) -> Path:
    path = work / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    for stage in STAGES:
        shutil.copytree(run / "ekfac" / stage, path / stage)
    return path


def larger_workload(run: Path, work: Path, rows: int) -> Path:
    """A run directory like ``run`` whose corpus is the first ``rows`` rows of its dataset: the
    EK-FAC fit and scores, the plain projected store and its dot-product scores against ``run``'s
    own query store, made (once) under ``work`` with ``run``'s own options. The model is ``run``'s
    fine-tuned checkpoint; most rows were not trained on, which changes nothing the cascade
    measures (how much of EK-FAC's own top-10 it recovers)."""
    from bergson import EkfacConfig, IndexConfig, ScoreConfig, build, ekfac, score
    from bergson.config import load_yaml

    out = work / f"workload_{rows}"
    if (out / "scores_dot" / "manifest.json").exists():
        return out
    base = load_yaml(EkfacConfig, run / "ekfac" / "ekfac.yaml")
    data = replace(base.data, split=f"train[:{rows}]")
    ekfac(replace(base, run_path=str(out / "ekfac"), data=data, overwrite=True))
    train = load_yaml(IndexConfig, run / "train" / "config.yaml")
    build(replace(train, run_path=str(out / "train"), data=data, overwrite=True))
    shutil.copytree(run / "query", out / "query", dirs_exist_ok=True)
    score(
        ScoreConfig(run_path=str(out / "scores_dot"), index=str(out / "train"), query_path=str(out / "query"))
    )
    return out


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--run", default="runs/quality_lm/run_bee8c4a5c0")
    parser.add_argument("--work", default="runs/cascade_bench")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--corpus_rows",
        type=int,
        default=0,
        help="score the first N rows of the run's dataset instead of its training rows (0: those)",
    )
    parser.add_argument(
        "--timed_fraction", type=float, default=0.05, help="of the rows, for the timed cascades"
    )
    args = parser.parse_args()

    from bergson import EkfacConfig, IndexConfig, ScoreConfig, build, ekfac, load_gradients, score
    from bergson.config import load_yaml
    from bergson.config.cascade import CascadeEkfacConfig
    from bergson.methods.cascade import UNSCORED, cascade

    run, work = Path(args.run), Path(args.work)
    if args.corpus_rows:
        run = larger_workload(run, work, args.corpus_rows)
    base = load_yaml(EkfacConfig, run / "ekfac" / "ekfac.yaml")
    options = {f.name: getattr(base, f.name) for f in fields(EkfacConfig)}
    full = np.asarray(load_gradients(run / "ekfac" / "scores")["scores"], np.float64)
    n, nq = full.shape
    truth = [set(t.tolist()) for t in top(full, 10)]

    def seconds_of(path: str) -> float:
        return json.loads((Path(path) / "timings.json").read_text())["scores"]

    def run_cascade(source: Path, k: int, name: str) -> tuple[Any, float]:
        cfg = CascadeEkfacConfig(
            **{**options, "run_path": str(fresh(work, name, run)), "overwrite": False, "top_k": k},
            candidates=str(source),
        )
        return cascade(cfg), seconds_of(cfg.run_path)

    def run_full(name: str, **changes: Any) -> tuple[Any, float]:
        cfg = EkfacConfig(
            **{**options, "run_path": str(fresh(work, name, run)), "overwrite": False, **changes}
        )
        return ekfac(cfg), seconds_of(cfg.run_path)

    # a first stage that approximates EK-FAC itself: its preconditioned queries projected like the
    # projected training store (ekfac --projected_queries), scored against it by `bergson score --index`
    sources = {name: run / name for name in SOURCES[:2] if (run / name).exists()}
    if (run / "train").exists():
        p = load_gradients(run / "train").manifest.projection["dim"]
        projected, _ = run_full("projected_queries", projected_queries=True, projection_dim=p)
        score(
            ScoreConfig(
                run_path=str(work / "scores_ekfac_projected"),
                index=str(run / "train"),
                query_path=str(Path(projected.root).parent / "query_store"),
                overwrite=True,
            )
        )
        sources["ekfac_projected"] = work / "scores_ekfac_projected"

    # K-FAC-whitened first stages: both stores rebuilt with --whitening (the full run's EK-FAC fit)
    first_stage_s: dict[str, float] = {}
    for p in WHITENED if (run / "train").exists() else ():
        label = f"kfac_whitened_p{p}"
        seconds = 0.0
        for side in ("train", "query"):
            cfg = load_yaml(IndexConfig, run / side / "config.yaml")
            cfg = replace(
                cfg, run_path=str(work / f"{label}_{side}"), projection_dim=p, whitening=str(run / "ekfac"),
                whitening_damping=WHITENING_DAMPING, overwrite=True,
            )  # fmt: skip
            start = time.perf_counter()
            build(cfg)
            if side == "train":  # the store every later query set reuses; the query side is per set
                seconds = time.perf_counter() - start
        start = time.perf_counter()
        score(
            ScoreConfig(
                run_path=str(work / f"scores_{label}"),
                index=str(work / f"{label}_train"),
                query_path=str(work / f"{label}_query"),
                overwrite=True,
            )
        )
        first_stage_s[label] = round(seconds + time.perf_counter() - start, 3)
        sources[label] = work / f"scores_{label}"

    recall: dict[str, list[dict[str, Any]]] = {}
    pearson: dict[str, list[float]] = {}
    max_diff = 0.0
    for label, source in sources.items():
        cheap = np.asarray(load_gradients(source)["scores"], np.float64)
        pearson[label] = [round(float(np.corrcoef(cheap[:, c], full[:, c])[0, 1]), 3) for c in range(nq)]
        rows_out = []
        for fraction in FRACTIONS:
            k = max(1, round(fraction * n))
            store, _ = run_cascade(source, k, f"{label}_{fraction}")
            s = np.asarray(store["scores"], np.float64)
            rescored = np.array(store.manifest.score["cascade"]["rescored_row_ids"])
            assert rescored.tolist() == np.unique(np.concatenate(top(cheap, k))).tolist()
            max_diff = max(
                max_diff, float((np.abs(s[rescored] - full[rescored]) / np.abs(full).max(0)).max())
            )
            assert (np.delete(s, rescored, axis=0) == np.float32(UNSCORED)).all()
            found = [len(truth[q] & set(top(s, 10)[q].tolist())) / 10 for q in range(nq)]
            rows_out.append(
                {
                    "k_per_query": k,
                    "k_fraction": fraction,
                    "rescored_rows": len(rescored),
                    "fraction_rescored": round(len(rescored) / n, 4),
                    "recall_at_10_mean": round(float(np.mean(found)), 3),
                    "recall_at_10_per_query": found,
                }
            )
        recall[label] = rows_out

    # scoring time: full EK-FAC scoring vs the cascade with k = --timed_fraction of the rows per query,
    # and with the largest k whose union is within --timed_fraction of the rows; alternated
    label = next((k for k in ("kfac_whitened_p96", "ekfac_projected") if k in sources), "scores_cosine_opt")
    cheap = np.asarray(load_gradients(sources[label])["scores"], np.float64)
    union_k = 1
    while len(np.unique(np.concatenate(top(cheap, union_k + 1)))) <= args.timed_fraction * n:
        union_k += 1
    ks = {"k_per_query": max(1, round(args.timed_fraction * n)), "k_union": union_k}
    full_s: list[float] = []
    cascade_s: dict[str, list[float]] = {name: [] for name in ks}
    rescored_rows: dict[str, int] = {}
    loads = []
    for i in range(args.repeats):
        full_s.append(run_full(f"time_full_{i}")[1])
        loads.append(loadavg())
        for name, k in ks.items():
            store, seconds = run_cascade(sources[label], k, f"time_{name}_{i}")
            rescored_rows[name] = store.manifest.score["cascade"]["rescored_rows"]
            cascade_s[name].append(seconds)
            loads.append(loadavg())
    fitted = json.loads((run / "ekfac" / "timings.json").read_text())
    fit_seconds = sum(fitted.get(s, 0.0) for s in STAGES)
    best_full = min(full_s)
    timed = {
        name: {
            "k_per_query": ks[name],
            "rescored_rows": rescored_rows[name],
            "fraction_rescored": round(rescored_rows[name] / n, 4),
            "cascade_scoring_s": cascade_s[name],
            "best_cascade_scoring_s": min(cascade_s[name]),
            "cascade_over_full_scoring": round(min(cascade_s[name]) / best_full, 3),
        }
        for name in ks
    }
    out: dict[str, Any] = {
        "workload": str(run),
        "rows": n,
        "queries": nq,
        "ekfac_top10_union_rows": len(set().union(*truth)),
        "factors": "fitted on the whole corpus (the full run's stages, copied into each run directory)",
        "max_rel_diff_rescored_vs_full_ekfac": max_diff,
        "pearson_with_ekfac_per_query": pearson,
        "recall_at_10_of_ekfac_top10": recall,
        "timing": {
            "candidates": label,
            "full_scoring_s": full_s,
            "best_full_scoring_s": best_full,
            **timed,
            "ekfac_fit_s_of_the_cached_run": round(fit_seconds, 3),
            "whitened_first_stage_s": first_stage_s,
            "loadavg_1min": loads,
            "cpu_count": os.cpu_count(),
        },
    }

    # the goal: >= 0.9 of EK-FAC's top-10 when the rows rescored (the union over the queries)
    # are at most --timed_fraction of the corpus, at <= 10% of full scoring time
    def at_budget(cheap: np.ndarray) -> dict[str, Any]:
        k = 1
        while len(np.unique(np.concatenate(top(cheap, k + 1)))) <= args.timed_fraction * n:
            k += 1
        rows = np.unique(np.concatenate(top(cheap, k)))
        cascaded = np.full_like(full, -np.inf)
        cascaded[rows] = full[rows]  # rescored rows' scores equal the full run's (checked above)
        found = [len(truth[q] & set(top(cascaded, 10)[q].tolist())) / 10 for q in range(nq)]
        return {
            "k_per_query": k,
            "fraction_rescored": round(len(rows) / n, 4),
            "recall_at_10": float(np.mean(found)),
        }

    budget = {
        src: at_budget(np.asarray(load_gradients(path)["scores"], np.float64))
        for src, path in sources.items()
    }
    out["goal"] = {
        "budget_fraction": args.timed_fraction,
        "at_budget": budget,
        "recall_met": {src: b["recall_at_10"] >= 0.9 for src, b in budget.items()},
        "time_met": {label: timed["k_union"]["cascade_over_full_scoring"] <= 0.10},
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
