"""The fact-tracing benchmark's ground: its metrics on hand-ranked examples and its corpus labels."""

from __future__ import annotations

import numpy as np

from benchmarks.fact_tracing import corpus as corpus_mod
from benchmarks.fact_tracing.metrics import evaluate, relevant_ranks


def test_metrics_by_hand_and_ties_count_against_the_method():
    scores = np.array([[0.9, 0.1, 0.5, 0.3], [0.2, 0.2, 0.2, 0.2]])
    relevant = [{2, 3}, {1}]
    ranks = relevant_ranks(scores, relevant)
    assert ranks[0].tolist() == [2, 3]  # 0.5 is second, 0.3 third
    assert ranks[1].tolist() == [4]  # tied with everything: ranked last
    assert evaluate(scores, relevant, k=2) == {"mrr": round((1 / 2 + 1 / 4) / 2, 4), "recall@2": 0.25}


def test_every_relevant_document_states_its_fact():
    corpus = corpus_mod.generate(20, seed=1, num_passages=10)
    assert len(corpus.queries) == 20
    for q, rel in zip(corpus.queries, corpus.relevant()):
        fact = corpus.facts[q["fact_id"]]
        assert len(rel) == 3, q  # three statements per fact by default
        assert q["completion"].strip() == fact["object"] and fact["subject"] in q["prompt"]
        for d in rel:
            text = corpus.docs[d]["text"]
            assert fact["subject"] in text and fact["object"] in text
