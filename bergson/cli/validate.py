"""``bergson validate RUN_PATH --recipe MAGIC_RUN_OR_YAML --scores STORE [STORE ...]``"""

from __future__ import annotations

from ..config import ValidateConfig

CONFIG = ValidateConfig


def run(cfg: ValidateConfig) -> None:
    from ..validation import validate

    report = validate(cfg)
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
