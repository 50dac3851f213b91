"""Pure helpers of the side-by-side run: score agreement, LDS on retrained subsets, the table.

Scores are [queries, train] arrays oriented like bergson's: positive = training on the example
lowers the query's loss. The correlation arithmetic is ``bergson.validation.correlations``
(Pearson, and Spearman with ties averaged by ``bergson.validation.rank``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from bergson.validation import correlations


def agreement(ours: np.ndarray, theirs: np.ndarray) -> dict[str, float]:
    """Agreement of two score matrices of the same shape: Pearson and Spearman over all
    entries, and the Spearman of each query's column of training scores averaged over queries."""
    a, b = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"score shapes differ: {a.shape} vs {b.shape}")
    if a.ndim != 2:
        raise ValueError(f"scores must be [queries, train], got shape {a.shape}")
    overall = correlations(a.ravel(), b.ravel())
    per_query = [correlations(a[q], b[q])["spearman"] for q in range(a.shape[0])]
    return {
        "pearson": overall["pearson"],
        "spearman": overall["spearman"],
        "spearman_per_query": float(np.nanmean(per_query))
        if not all(map(math.isnan, per_query))
        else math.nan,
    }


def lds(scores: np.ndarray, subsets: np.ndarray, query_losses: np.ndarray) -> dict[str, float]:
    """Linear datamodeling score against models retrained on subsets of the training set.

    ``scores`` [queries, train]; ``subsets`` [subsets, train] booleans, True where the example
    was in that retrain's training set; ``query_losses`` [subsets, queries], each retrained
    model's loss on each query. The attribution predicts the loss of a retrain on S to fall
    with Σ_{i∈S} score_i, so for every query we take the Spearman correlation over subsets
    between that sum and the negated measured loss, and average over queries (queries whose
    losses or predictions are constant are skipped). Also the Pearson analogue.
    """
    s = np.asarray(scores, np.float64)
    m = np.asarray(subsets, bool)
    loss = np.asarray(query_losses, np.float64)
    if m.ndim != 2 or s.ndim != 2 or m.shape[1] != s.shape[1]:
        raise ValueError(f"subsets {m.shape} and scores {s.shape} must share the training axis")
    if loss.shape != (m.shape[0], s.shape[0]):
        raise ValueError(
            f"query_losses must be [subsets, queries] = {(m.shape[0], s.shape[0])}, got {loss.shape}"
        )
    predicted = m.astype(np.float64) @ s.T  # [subsets, queries]
    per = [correlations(-loss[:, q], predicted[:, q]) for q in range(s.shape[0])]
    spearman = [c["spearman"] for c in per if not math.isnan(c["spearman"])]
    pearson = [c["pearson"] for c in per if not math.isnan(c["pearson"])]
    return {
        "spearman": float(np.mean(spearman)) if spearman else math.nan,
        "pearson": float(np.mean(pearson)) if pearson else math.nan,
        "queries": len(spearman),
    }


def random_halves(num_train: int, count: int, seed: int) -> np.ndarray:
    """``count`` boolean masks [count, num_train], each keeping a random half of the examples."""
    if count < 2:
        raise ValueError("LDS needs at least 2 subsets")
    rng = np.random.default_rng(seed)
    masks = np.zeros((count, num_train), bool)
    for k in range(count):
        masks[k, rng.choice(num_train, size=num_train // 2, replace=False)] = True
    return masks


# ---------------------------------------------------------------------------------------------
# The table


@dataclass
class Row:
    """One (peer, workload, method) cell of the side-by-side table."""

    peer: str
    workload: str
    method: str
    wall_s: float | None = None
    peak_rss_mb: float | None = None
    agreement: dict[str, float] | None = None
    """With ours on the same method (None: ours has no such method, or this row is ours)."""
    lds: dict[str, float] | None = None
    reason: str | None = None
    """Why the row has no numbers (the peer cannot run this workload here), or a caveat."""
    details: dict[str, object] = field(default_factory=dict)


COLUMNS = (
    "peer",
    "workload",
    "method",
    "wall s",
    "peak RSS MB",
    "Spearman vs ours",
    "Pearson vs ours",
    "LDS",
    "note",
)


def _num(x: float | None, digits: int) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def table_cells(row: Row) -> list[str]:
    agree = row.agreement or {}
    return [
        row.peer,
        row.workload,
        row.method,
        _num(row.wall_s, 1),
        _num(row.peak_rss_mb, 0),
        _num(agree.get("spearman"), 3),
        _num(agree.get("pearson"), 3),
        _num((row.lds or {}).get("spearman"), 3),
        (row.reason or "").replace("|", "/").replace("\n", " "),
    ]


def markdown_table(rows: Sequence[Row]) -> str:
    """A GitHub-flavoured Markdown table, one line per row, in the given order."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(table_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"
