"""Writing a quality benchmark's results: a markdown table and a grouped bar plot (matplotlib, Agg)."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def fmt_corr(mean: float, std: float) -> str:
    """``0.812 ± 0.041`` (or ``n/a`` when the correlation is undefined)."""
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.3f} ± {std:.3f}" if math.isfinite(std) else f"{mean:.3f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; numbers are written as given (format them first)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def machine() -> dict[str, Any]:
    """Where and when the figures were taken: CPUs, load average (other work on the machine), date."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpus": os.cpu_count(),
        "load_avg_1m": round(load[0], 2),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }


def save_json(out_dir: Path, name: str, report: Mapping[str, Any]) -> Path:
    """Write ``out_dir/NAME.json`` (making ``out_dir``) and return ``out_dir``, where the
    benchmark's markdown table and plot go beside it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    return out_dir


def bar_plot(
    path: Path,
    groups: Sequence[str],
    series: Mapping[str, Sequence[tuple[float, float]]],
    ylabel: str,
    title: str,
) -> None:
    """Grouped bars with error bars: ``series[label][g] = (mean, std)`` for each group ``g``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) + 3.5), 4.0))
    width = 0.8 / max(1, len(series))
    for k, (label, values) in enumerate(series.items()):
        xs = [g + (k - (len(series) - 1) / 2) * width for g in range(len(groups))]
        means = [m if math.isfinite(m) else 0.0 for m, _ in values]
        stds = [s if math.isfinite(s) else 0.0 for _, s in values]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=label)
    ax.set_xticks(range(len(groups)), list(groups), rotation=20, ha="right")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
