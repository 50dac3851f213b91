"""BM25 ranking of the training documents for each query (the lexical baseline of TrackStar).

Uses ``rank_bm25.BM25Okapi`` (``pip install rank_bm25``; k1 = 1.5, b = 0.75, its default
epsilon floor for the idf of very common terms). Text is lower-cased and split into runs of
letters and digits; no stemming or stop words. The query text is prompt + completion, as in
the TrackStar paper, so the fact's subject and object both count.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

_WORD = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def bm25_scores(docs: Sequence[str], queries: Sequence[str], k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """[n_queries, n_docs] BM25 scores (higher = more relevant)."""
    from rank_bm25 import BM25Okapi

    index = BM25Okapi([tokenize(d) for d in docs], k1=k1, b=b)
    return np.stack([np.asarray(index.get_scores(tokenize(q)), dtype=np.float64) for q in queries])
