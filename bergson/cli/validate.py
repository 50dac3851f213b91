"""``bergson validate RUN_PATH --recipe MAGIC_RUN_OR_YAML --scores STORE [STORE ...]``"""

from __future__ import annotations

from typing import Any

from ..config import ValidateConfig

CONFIG = ValidateConfig


def run(cfg: ValidateConfig) -> None:
    from ..validation import validate

    report = validate(cfg)
    if report["protocol"] == "top_k":
        _print_top_k(report, cfg.run_path)
        return
    print(
        f"{report['protocol']}: {report['subsets']} retrains without {report['removed_per_subset']} of "
        f"{report['documents']} documents, {report['queries']} queries (report: {cfg.run_path}/validation.json)"
    )
    print(f"{'store':<40} {'method':<10} {'spearman':>9} {'± std':>7} {'pearson':>8} {'aggregate ρ':>12}")
    for name, e in report["stores"].items():
        sp, sd, pe = (
            e.get("mean_spearman", float("nan")),
            e.get("std_spearman", float("nan")),
            e.get("mean_pearson", float("nan")),
        )
        print(
            f"{name[-40:]:<40} {e['method']:<10} {sp:>9.3f} {sd:>7.3f} {pe:>8.3f} {e['aggregate']['spearman']:>12.3f}"
        )


def _print_top_k(report: dict[str, Any], run_path: str) -> None:
    print(
        f"top_k: each query's K highest-scoring of {report['documents']} documents removed, against "
        f"{report['random_removals_per_k']} random removals of K; {report['queries']} queries "
        f"(report: {run_path}/validation.json, validation.md)"
    )
    print(
        f"{'store':<32} {'method':<10} {'K':>4} {'top-k Δ':>10} {'random Δ':>10} {'difference':>11} {'beats random':>13}"
    )
    for name, e in report["stores"].items():
        for k, s in e["top_k"].items():
            print(
                f"{name[-32:]:<32} {e['method']:<10} {k:>4} {s['mean_loss_change']:>10.4g} {s['mean_random']:>10.4g} "
                f"{s['mean_difference']:>11.4g} {s['share_beating_random']:>12.0%}"
            )
