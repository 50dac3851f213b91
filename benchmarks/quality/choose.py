"""The "which method should I use" page, written from the measured quality tables.

Reads the results of :mod:`benchmarks.quality.lm`, :mod:`benchmarks.quality.two_stage` and
:mod:`benchmarks.quality.classifier` (whichever exist in ``--results``) and writes
``docs/methods/choosing.md``: one table of every method's LDS against its cost in training runs on
each benchmark, the methods that no other method beats on both (the Pareto front), and the
cheapest method within 0.05 LDS of the best. Each of those benchmarks calls :func:`write_page` when
it writes its default results, so the page follows the latest measurements.

    python -m benchmarks.quality.choose [--results benchmarks/quality/results] [--out docs/methods/choosing.md]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from .common import markdown_table
from .digits import LABELS as DIGITS_LABELS
from .digits import SOURCE_CHECKPOINTS as DIGITS_SOURCE_CHECKPOINTS
from .lm import LABELS as LM_LABELS
from .lm import SOURCE_CHECKPOINTS as LM_SOURCE_CHECKPOINTS

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
PAGE = REPO / "docs" / "methods" / "choosing.md"
# one name per method across the benchmarks (the LM calls the Adam-normalized cosine cosine_opt)
SAME = {"cosine_adam": "cosine_opt"}
# SOURCE's checkpoint count differs between the benchmarks (the page's notes give both)
LABELS = {
    **LM_LABELS,
    "source": "SOURCE",
    "source_adam": "SOURCE, Adam steps",
    "source_adam_discrete": "SOURCE, Adam steps and first moment, discrete",
    "exact_if": DIGITS_LABELS["exact_if"],
}
NEEDS = {
    "dot": "the model",
    "cosine": "the model",
    "cosine_opt": "the model and its optimizer state",
    "trackstar": "the model and its optimizer state",
    "ekfac": "the model",
    "ekfac_k4": "the model",
    "astra": "the model",
    "lissa": "the model",
    "pcg": "the model",
    "trak": "the model",
    "trak4": "several trained models (seeds or checkpoints)",
    "source": "a few checkpoints and the learning-rate schedule",
    "source_adam": "a few checkpoints with their optimizer state, and the schedule",
    "source_adam_discrete": "a few checkpoints with their optimizer state, and the schedule",
    "unroll": "the model, its optimizer state and the training recipe (batch order, schedule)",
    "unroll_8": "the model, its optimizer state and the training recipe (batch order, schedule)",
    "magic": "the whole training recipe (it retrains)",
    "exact_if": "a model small enough for its full Hessian",
}


def _benchmarks(results: Path) -> dict[str, dict[str, tuple[float, float]]]:
    """{benchmark title: {method: (LDS, cost in training runs)}} of the results found."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    lm = results / "lm.json"
    if lm.is_file():
        d = json.loads(lm.read_text())
        rows = {
            m: (e["quality"]["LDS"]["mean_spearman"], e["training_runs"])
            for m, e in d["methods"].items()
            if "training_runs" in e
        }
        if rows:
            out[f"causal LM ({d['workload']['documents']} docs)"] = rows
    two = results / "two_stage.json"
    if two.is_file():
        d = json.loads(two.read_text())
        out["causal LM, two stages"] = {
            m: (e["mean_spearman"], e["training_runs"]) for m, e in d["methods"].items() if "_stage1" not in m
        }
    cls = results / "classifier.json"
    if cls.is_file():
        d = json.loads(cls.read_text())
        for kind, res in d["models"].items():
            rows = {
                str(SAME.get(m, m)): (e["lds"]["mean_spearman"], e["training_runs"])
                for m, e in res["methods"].items()
                if "training_runs" in e
            }
            if rows:
                out[f"digits, {kind}"] = rows
    return out


def pareto(rows: dict[str, tuple[float, float]]) -> list[str]:
    """Methods no other method matches or beats on both LDS and cost (strictly on one)."""
    front = []
    for m, (q, c) in rows.items():
        if not math.isfinite(q):
            continue
        beaten = any(
            (q2 >= q and c2 <= c) and (q2 > q or c2 < c)
            for m2, (q2, c2) in rows.items()
            if m2 != m and math.isfinite(q2)
        )
        if not beaten:
            front.append(m)
    return sorted(front, key=lambda m: rows[m][1])


def cheapest_near_best(rows: dict[str, tuple[float, float]], margin: float = 0.05) -> str | None:
    """The cheapest method whose LDS is within ``margin`` of the best one's."""
    finite = {m: v for m, v in rows.items() if math.isfinite(v[0])}
    if not finite:
        return None
    best = max(q for q, _ in finite.values())
    return min((m for m, (q, _) in finite.items() if q >= best - margin), key=lambda m: finite[m][1])


def page(results: Path) -> str:
    benches = _benchmarks(results)
    if not benches:
        raise SystemExit(f"no quality results in {results}: run python -m benchmarks.quality.lm first")
    methods = [m for m in LABELS if any(m in rows for rows in benches.values())]
    header = ["method", "needs", *(f"{b}: LDS / cost" for b in benches)]
    table = []
    for m in methods:
        cells = []
        for rows in benches.values():
            q, c = rows.get(m, (float("nan"), float("nan")))
            cells.append(
                "–"
                if not math.isfinite(c)
                else f"{q:.2f} / {c:.2f}"
                if math.isfinite(q)
                else f"n/a / {c:.2f}"
            )
        table.append([LABELS[m], NEEDS[m], *cells])
    lines = [
        "# Which method should I use?\n",
        "Written by `python -m benchmarks.quality.choose` from the measured quality tables "
        "([benchmarks](../benchmarks/quality.md)); do not edit by hand. Each cell is the method's LDS "
        "(Spearman correlation with real retraining, mean over queries; higher is better) and its cost in "
        "training runs of the same model on the same machine (wall time of the method's commands over one "
        "training run; lower is better). A dash: not run on that benchmark. SOURCE unrolls through "
        f"{LM_SOURCE_CHECKPOINTS} checkpoints of the run on the causal LM benchmarks and "
        f"{DIGITS_SOURCE_CHECKPOINTS} on digits.\n",
        markdown_table(header, table),
        "\n## What the measurements say\n",
    ]
    for b, rows in benches.items():
        front = pareto(rows)
        near = cheapest_near_best(rows)
        best = max((m for m in rows if math.isfinite(rows[m][0])), key=lambda m: rows[m][0], default=None)
        text = (
            f"- **{b}**: the best LDS is {LABELS[best]} ({rows[best][0]:.2f} at {rows[best][1]:.2f} runs)"
            if best
            else f"- **{b}**:"
        )
        if near and near != best:
            text += f"; the cheapest within 0.05 of it is {LABELS[near]} ({rows[near][0]:.2f} at {rows[near][1]:.2f} runs)"
        text += ". Not beaten on both quality and cost: " + "; ".join(LABELS[m] for m in front) + "."
        lines.append(text)
    lines += [
        "",
        "## Rules of thumb\n",
        "- To search a large corpus quickly (retrieval, data selection), build a projected store once "
        "(`bergson build`) and score by gradient similarity; cosine with the optimizer's normalizer or "
        "TrackStar when the optimizer state is at hand.",
        "- To rank what really changes a prediction, use an inverse-curvature method: EK-FAC, or ASTRA when "
        "its extra iterations pay for themselves on your data (the tables above).",
        "- With checkpoints and the learning-rate schedule of the run (a Trainer output directory), SOURCE "
        "unrolls through training (`--step_model adam` for runs trained with Adam or AdamW); with several "
        "trained models, TRAK averages over them.",
        "- With the trained model, its AdamW state and the recipe that trained it (its batch order and "
        "schedule), Unroll follows MAGIC's reverse pass at the final state without retraining (`bergson "
        "unroll`).",
        "- When you own the training recipe and the corpus is small enough to train through a few times, "
        "MAGIC is the closest to retraining.",
        "",
    ]
    return "\n".join(lines)


def write_page(results: Path = RESULTS, out: Path = PAGE) -> Path:
    out.write_text(page(results))
    return out


def refresh(out_dir: Path) -> None:
    """Rewrite the page when a benchmark has just written the default results (not a scratch run's)."""
    if Path(out_dir).resolve() == RESULTS:
        write_page()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--out", type=Path, default=PAGE)
    args = p.parse_args(argv)
    print(write_page(args.results, args.out))


if __name__ == "__main__":
    main()
