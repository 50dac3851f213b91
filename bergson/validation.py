"""``bergson validate``: scores checked against real retraining without subsets of documents.

For each subset S of training documents the recipe is retrained with S removed (its tokens
get weight 0: the same data order, batches and number of steps, the removed documents simply
absent from their batches' mean loss), and the change of each query's loss is measured:
Δ_q(S) = Q_q(trained without S) − Q_q(trained on everything). A scores store predicts
Δ_q(S) ≈ Σ_{i ∈ S} score_{i,q} (bergson scores are oriented so that a positive score means the
document lowers the query loss, so removing it raises the loss). The report gives, per score
column and averaged over columns, the Spearman and Pearson correlations over subsets.

Protocols: ``leave_k_out`` removes a random ``fraction`` of the documents; ``lds`` removes a
random half (the linear datamodeling score of Park et al. 2023, which trains on random
halves). Retrains are cached by recipe and subset, so several methods are checked against the
same retrains.

``top_k`` asks the counterfactual directly: for each query (score column), remove its K
highest-scoring documents, retrain, and compare the query's loss change with that of removing
K random documents (``num_subsets`` draws per K, shared by every store). Scores that find the
query's proponents raise its loss more than random removals do (a positive difference, a
ratio above 1); scores of the wrong sign lower it. The report gives, per store, K and query,
the loss change, the random removals' mean and standard deviation, their difference, ratio and
z-score, and per store and K the share of queries whose top-k removal beats random.

Every report is written as ``validation.json`` and as a table, ``validation.md``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .config import MagicConfig, ValidateConfig
from .core.files import atomic_write_bytes
from .errors import BergsonError

logger = logging.getLogger(__name__)


def draw_subsets(num_docs: int, protocol: str, fraction: float, count: int, seed: int) -> list[np.ndarray]:
    """Sorted document indices removed in each subset."""
    if count < 2:
        raise BergsonError(f"--num_subsets {count}: correlations need at least 2 subsets")
    if protocol == "leave_k_out":
        if not 0 < fraction < 1:
            raise BergsonError(f"--fraction {fraction}: must be between 0 and 1")
        k = max(1, round(fraction * num_docs))
    elif protocol == "lds":
        k = num_docs // 2
    else:
        raise BergsonError(f"--protocol {protocol!r}: choose leave_k_out or lds")
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(num_docs, size=k, replace=False)) for _ in range(count)]


def rank(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (what Spearman's correlation needs)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def correlations(measured: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman correlations of two 1-D arrays (nan when one is constant)."""

    def corr(a: np.ndarray, b: np.ndarray) -> float:
        if np.std(a) == 0 or np.std(b) == 0:
            return float("nan")
        return float(np.corrcoef(a, b)[0, 1])

    return {"pearson": corr(measured, predicted), "spearman": corr(rank(measured), rank(predicted))}


def score_correlations(scores: np.ndarray, subsets: list[np.ndarray], measured: np.ndarray) -> dict[str, Any]:
    """How well scores predict retraining: the correlations over subsets of the predicted loss
    change Σ_{i ∈ S} score_{i,q} with the ``measured`` one ([subsets, queries]).

    ``scores`` is [documents, queries] (or [documents, 1], one column for all queries).
    Returns ``per_query`` correlations with their ``mean_``/``std_`` over queries (nan-aware;
    only with one column per query) and the ``aggregate`` correlation of the mean over queries.
    """
    nq = measured.shape[1]
    predicted = np.stack([scores[idx].sum(0) for idx in subsets])  # [subsets, columns]
    entry: dict[str, Any] = {}
    if scores.shape[1] == nq:
        per = [correlations(measured[:, q], predicted[:, q]) for q in range(nq)]
        entry["per_query"] = per
        for key in ("spearman", "pearson"):
            vals = np.array([p[key] for p in per])
            entry[f"mean_{key}"] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
            entry[f"std_{key}"] = float(np.nanstd(vals)) if np.isfinite(vals).any() else float("nan")
    entry["aggregate"] = correlations(measured.mean(1), predicted.mean(1))
    return entry


def recipe_identity(cfg: MagicConfig) -> dict[str, Any]:
    """What determines a retrain's outcome (not where or how attribution is run)."""
    d = asdict(cfg)
    for key in (
        "run_path",
        "overwrite",
        "query_mode",
        "per_token",
        "checkpoints",
        "memory_budget_gb",
        "top_k",
        "save_checkpoints",
    ):
        d.pop(key, None)
    return d


class Retrainer:
    """Retrain a recipe with documents removed and measure every query's final loss (cached)."""

    def __init__(self, recipe: MagicConfig, cache_dir: str | Path, device: str | None = None):
        from .methods.magic.command import prepare
        from .methods.magic.replay import Replay
        from .runs.documents import tokens_fingerprint

        if device is not None:
            recipe = replace(recipe, device=device)
        self.recipe = recipe
        self.model, tokenizer, self.docs, self.queries = prepare(recipe)
        self.pad = tokenizer.pad_token_id or 0
        self.replay = Replay(self.model, self.docs, recipe.training, self.pad, progress=False)
        key = json.dumps(
            {
                "recipe": recipe_identity(recipe),
                "docs": tokens_fingerprint(self.docs),
                "queries": tokens_fingerprint(self.queries),
            },
            sort_keys=True,
            default=str,
        )
        self.dir = Path(cache_dir) / hashlib.sha256(key.encode()).hexdigest()[:16]
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "recipe.json").write_text(key)

    def query_losses(self, removed: np.ndarray) -> np.ndarray:
        """Each query's mean loss after training without the ``removed`` documents."""
        import torch

        from .methods.magic.replay import query_losses

        ids = np.sort(np.asarray(removed, np.int64))
        name = hashlib.sha256(ids.tobytes()).hexdigest()[:16]
        path = self.dir / f"{name}.json"
        if path.is_file():
            return np.asarray(json.loads(path.read_text())["query_losses"])
        start = time.perf_counter()
        w = torch.as_tensor(self.replay.layout.ones_except(ids), dtype=self.replay.ones().dtype)
        state, _ = self.replay.run(w.to(self.replay.device))
        with torch.no_grad():
            losses = query_losses(self.model, state.params, self.queries, self.pad).double().cpu().numpy()
        record = {
            "removed": ids.tolist(),
            "query_losses": losses.tolist(),
            "seconds": time.perf_counter() - start,
        }
        atomic_write_bytes(path, json.dumps(record).encode())
        return losses


def check_store(store: Any, name: str, num_docs: int, num_queries: int) -> np.ndarray:
    """The [documents, columns] score matrix of a store, or an error naming it."""
    if store.manifest.kind != "scores":
        raise BergsonError(f"--scores {name}: a {store.manifest.kind} store, not a scores store")
    s = np.asarray(store["scores"], np.float64)
    if s.shape[0] != num_docs:
        raise BergsonError(
            f"--scores {name}: {s.shape[0]} rows, but the recipe trains on {num_docs} documents; "
            "score the recipe's own training set"
        )
    if s.shape[1] not in (1, num_queries):
        raise BergsonError(
            f"--scores {name}: {s.shape[1]} columns; expected one per query ({num_queries}) or one in total"
        )
    return s


def validate(cfg: ValidateConfig) -> dict[str, Any]:
    """Retrain without each subset (cached) and correlate the loss changes with every store's
    predictions; writes validation.json at ``cfg.run_path`` and returns the report."""
    from .methods.magic.command import load_recipe
    from .store import load_gradients

    if not cfg.run_path:
        raise BergsonError("run_path is required: the output directory of the report")
    if not cfg.recipe:
        raise BergsonError("--recipe is required: a `bergson magic` config YAML or run directory")
    if not cfg.scores:
        raise BergsonError("--scores is required: one or more scores stores to check")
    check_protocol_options(cfg)
    recipe = load_recipe(cfg.recipe)
    stores = {name: load_gradients(name) for name in cfg.scores}
    cache = cfg.cache_dir or str(Path(recipe.run_path or cfg.run_path) / "retrains")
    retrainer = Retrainer(recipe, cache, None if cfg.device == "auto" else cfg.device)
    n, nq = len(retrainer.docs), len(retrainer.queries)
    matrices = {name: check_store(s, name, n, nq) for name, s in stores.items()}
    if cfg.protocol == "top_k":
        methods = {name: (s.manifest.score or {}).get("kind", "gradient") for name, s in stores.items()}
        report = top_k_removals(retrainer, matrices, cfg.top_k, cfg.num_subsets, cfg.seed, methods)
        return _write(cfg.run_path, report)
    subsets = draw_subsets(n, cfg.protocol, cfg.fraction, cfg.num_subsets, cfg.seed)
    start = time.perf_counter()
    base = retrainer.query_losses(np.array([], np.int64))
    measured = np.stack(
        [retrainer.query_losses(s) - base for s in tqdm(subsets, desc="retraining", unit="run")]
    )  # [subsets, queries]
    report: dict[str, Any] = {
        "protocol": cfg.protocol,
        "removed_per_subset": len(subsets[0]),
        "documents": n,
        "queries": nq,
        "subsets": len(subsets),
        "seed": cfg.seed,
        "retrain_cache": str(retrainer.dir),
        "retrain_seconds": round(time.perf_counter() - start, 2),
        "base_query_losses": base.tolist(),
        "stores": {},
    }
    for name, s in matrices.items():
        entry: dict[str, Any] = {"method": (stores[name].manifest.score or {}).get("kind", "gradient")}
        report["stores"][name] = {**entry, **score_correlations(s, subsets, measured)}
    return _write(cfg.run_path, report)


def check_protocol_options(cfg: ValidateConfig) -> None:
    """Refuse an option the chosen protocol does not read."""
    default = ValidateConfig()
    if cfg.protocol != "top_k" and list(cfg.top_k) != default.top_k:
        raise BergsonError(
            f"--top_k {' '.join(map(str, cfg.top_k))}: only --protocol top_k removes each query's top "
            f"documents, and the protocol is {cfg.protocol}; pass --protocol top_k or drop --top_k"
        )
    if cfg.protocol in ("top_k", "lds") and cfg.fraction != default.fraction:
        what = "removes --top_k documents" if cfg.protocol == "top_k" else "removes half of the documents"
        raise BergsonError(
            f"--fraction {cfg.fraction}: only --protocol leave_k_out reads it; {cfg.protocol} {what}. "
            "Drop --fraction"
        )
    if cfg.protocol == "top_k":
        if not cfg.top_k or any(k < 1 for k in cfg.top_k):
            raise BergsonError(f"--top_k {cfg.top_k}: give one or more numbers of documents, each >= 1")
        if cfg.num_subsets < 2:
            raise BergsonError(
                f"--num_subsets {cfg.num_subsets}: top_k compares with the mean and spread of at least 2 "
                "random removals per K"
            )


def top_k_removals(
    retrainer: Retrainer,
    matrices: dict[str, np.ndarray],
    ks: list[int],
    num_random: int,
    seed: int,
    methods: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The ``top_k`` protocol on score matrices ([documents, one column per query or one in
    total]): for each store, K and column, the loss change of removing the column's K
    highest-scoring documents against ``num_random`` random removals of K (shared by all
    stores). A single column is checked against the mean query loss."""
    n, nq = len(retrainer.docs), len(retrainer.queries)
    ks = sorted(set(int(k) for k in ks))
    if ks[-1] >= n:
        raise BergsonError(f"--top_k {ks[-1]}: the recipe trains on {n} documents; remove fewer than all")
    start = time.perf_counter()
    base = retrainer.query_losses(np.array([], np.int64))
    random_sets, random_deltas = {}, {}
    for k in ks:
        rng = np.random.default_rng([seed, k])
        random_sets[k] = [np.sort(rng.choice(n, size=k, replace=False)) for _ in range(num_random)]
        random_deltas[k] = np.stack(
            [retrainer.query_losses(s) - base for s in tqdm(random_sets[k], desc=f"random {k}", unit="run")]
        )  # [draws, queries]
    report: dict[str, Any] = {
        "protocol": "top_k",
        "top_k": ks,
        "random_removals_per_k": num_random,
        "documents": n,
        "queries": nq,
        "seed": seed,
        "retrain_cache": str(retrainer.dir),
        "base_query_losses": base.tolist(),
        "random": {
            str(k): {
                "mean": random_deltas[k].mean(0).tolist(),
                "std": random_deltas[k].std(0, ddof=1).tolist(),
            }
            for k in ks
        },
        "stores": {},
    }
    for name, s in matrices.items():
        per_k: dict[str, Any] = {}
        for k in ks:
            rows = []
            for c in range(s.shape[1]):
                top = np.sort(np.argsort(-s[:, c], kind="stable")[:k])
                delta = retrainer.query_losses(top) - base
                if s.shape[1] == nq:
                    measured, rand = float(delta[c]), random_deltas[k][:, c]
                else:  # one column for all queries: their mean loss
                    measured, rand = float(delta.mean()), random_deltas[k].mean(1)
                rows.append({"query": c if s.shape[1] == nq else "mean", "removed": top.tolist(),
                             **compare_with_random(measured, rand)})  # fmt: skip
            per_k[str(k)] = {"queries": rows, **summarize(rows)}
        report["stores"][name] = {"method": (methods or {}).get(name, "scores"), "top_k": per_k}
    report["retrain_seconds"] = round(time.perf_counter() - start, 2)
    return report


def compare_with_random(measured: float, random: np.ndarray) -> dict[str, float]:
    """A top-k removal's loss change against random removals': their mean and (sample)
    standard deviation, the difference, the ratio and the z-score (nan where undefined)."""
    mean, std = float(random.mean()), float(random.std(ddof=1)) if len(random) > 1 else float("nan")
    return {
        "loss_change": measured,
        "random_mean": mean,
        "random_std": std,
        "difference": measured - mean,
        "ratio": measured / mean if mean != 0 else float("nan"),
        "z": (measured - mean) / std if std > 0 else float("nan"),
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per store and K: mean loss changes, and the shares of queries whose top-k removal raised
    the loss and raised it more than random removals did."""
    change = np.array([r["loss_change"] for r in rows])
    rand = np.array([r["random_mean"] for r in rows])
    return {
        "mean_loss_change": float(change.mean()),
        "mean_random": float(rand.mean()),
        "mean_difference": float((change - rand).mean()),
        "share_raising_loss": float((change > 0).mean()),
        "share_beating_random": float((change > rand).mean()),
    }


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table (one row per store, or per store, K and query for top_k)."""
    lines = [f"# bergson validate: {report['protocol']}", ""]
    lines.append(
        f"{report['documents']} training documents, {report['queries']} queries, seed {report['seed']}."
    )
    lines.append("")
    if report["protocol"] == "top_k":
        lines.append(
            f"Loss change of each query after removing its K highest-scoring documents, against "
            f"{report['random_removals_per_k']} random removals of K (positive: the loss rose)."
        )
        lines += ["", "| store | method | K | query | top-k Δ | random Δ (mean ± std) | difference | ratio | z |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, e in report["stores"].items():
            for k, entry in e["top_k"].items():
                for r in entry["queries"]:
                    lines.append(
                        f"| {name} | {e['method']} | {k} | {r['query']} | {r['loss_change']:.4g} | "
                        f"{r['random_mean']:.4g} ± {r['random_std']:.3g} | {r['difference']:.4g} | "
                        f"{r['ratio']:.3g} | {r['z']:.3g} |"
                    )
        return "\n".join(lines) + "\n"
    lines.append(
        f"{report['subsets']} retrains without {report['removed_per_subset']} documents each; "
        "correlations of the predicted and measured query loss changes."
    )
    lines += [
        "",
        "| store | method | spearman (mean ± std) | pearson | aggregate spearman |",
        "|---|---|---|---|---|",
    ]
    for name, e in report["stores"].items():
        sp, sd = e.get("mean_spearman", float("nan")), e.get("std_spearman", float("nan"))
        lines.append(
            f"| {name} | {e['method']} | {sp:.3f} ± {sd:.3f} | {e.get('mean_pearson', float('nan')):.3f} | "
            f"{e['aggregate']['spearman']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _write(run_path: str, report: dict[str, Any]) -> dict[str, Any]:
    out = Path(run_path)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "validation.json", json.dumps(report, indent=2).encode())
    atomic_write_bytes(out / "validation.md", markdown(report).encode())
    return report
