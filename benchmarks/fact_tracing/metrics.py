"""Ranking metrics for fact tracing: MRR and recall@k of the relevant training documents.

``scores`` is a matrix [n_queries, n_docs], higher = more relevant. Each query's documents
are ranked by descending score with **ties broken against the relevant documents**: a
relevant document tied with non-relevant ones is ranked after all of them (the worst case),
so a constant or coarse score never earns credit from ties. NaN scores count as -inf.
Among tied relevant documents the order is by document id (it does not affect the metrics).

* MRR: mean over queries of 1 / rank of the first relevant document (0 when it has none).
* recall@k: mean over queries of the share of its relevant documents ranked in the top k.

Queries without relevant documents are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def relevant_ranks(scores: np.ndarray, relevant: Sequence[set[int] | Sequence[int]]) -> list[np.ndarray]:
    """1-based ranks of each query's relevant documents, ties resolved against them."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != len(relevant):
        raise ValueError(f"scores has shape {s.shape}; expected [{len(relevant)}, n_docs]")
    s = np.where(np.isnan(s), -np.inf, s)
    out = []
    for i, rel in enumerate(relevant):
        idx = np.fromiter(sorted(set(rel)), dtype=np.int64)
        is_rel = np.zeros(s.shape[1], dtype=np.int8)
        is_rel[idx] = 1
        # primary key: score descending; secondary: non-relevant (0) before relevant (1)
        order = np.lexsort((is_rel, -s[i]))
        pos = np.empty(s.shape[1], dtype=np.int64)
        pos[order] = np.arange(1, s.shape[1] + 1)
        out.append(np.sort(pos[idx]))
    return out


def evaluate(
    scores: np.ndarray, relevant: Sequence[set[int] | Sequence[int]], k: int = 10
) -> dict[str, float]:
    """``{"mrr": ..., "recall@k": ...}`` rounded to 4 digits."""
    ranks = [r for r in relevant_ranks(scores, relevant) if len(r)]
    if not ranks:
        return {"mrr": float("nan"), f"recall@{k}": float("nan")}
    return {
        "mrr": round(float(np.mean([1.0 / r[0] for r in ranks])), 4),
        f"recall@{k}": round(float(np.mean([np.mean(r <= k) for r in ranks])), 4),
    }
