"""Fact tracing with TrackStar: which training documents taught the model a fact?

Generates synthetic facts about fictional entities ("The capital of Redroia is Mevel."), each
stated in a few training documents among distractors (other sentences about the same entity,
sentences naming subject and object together without stating the fact, passages of the shipped
corpus), trains the shipped tiny model on them until it recalls the facts (the corpus and
trainer of ``benchmarks/fact_tracing``), then runs ``bergson trackstar``: gradients divided by
the training run's own Adam second moments, a preconditioner mixing training and query
statistics, and cosine scores. For each fact's held-out question it prints the top-k training
documents (``*`` marks a document that states the fact) and how often a true source is found.
The distractors are built to be hard: on the full benchmark (100 facts, ``python -m
benchmarks.fact_tracing.run``) TrackStar's MRR of the stating documents is about 0.3, and plain
lexical overlap (BM25) does much better on this synthetic corpus.

    python examples/fact_tracing.py                                # 20 facts (a few minutes)
    python examples/fact_tracing.py --num_facts 10 --num_passages 0 --epochs 10 --projection_dim 16   # a small slice

The TrackStar step is the same as
``bergson trackstar RUN --model RUN/model --dataset RUN/data/train.jsonl --query.dataset
RUN/data/queries.jsonl --query.prompt_column prompt --query.completion_column completion
--optimizer_state RUN/model/optimizer.pt``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the corpus generator and trainer live in benchmarks/fact_tracing

from benchmarks.fact_tracing import corpus as corpus_mod  # noqa: E402
from benchmarks.fact_tracing.train import train  # noqa: E402
from bergson import DataConfig, TrackstarConfig, trackstar  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run_dir", default="runs/fact_tracing_example")
    parser.add_argument("--num_facts", type=int, default=20)
    parser.add_argument(
        "--num_passages", type=int, default=60, help="distractor passages of the shipped corpus"
    )
    parser.add_argument("--epochs", type=float, default=40, help="training epochs on the fact corpus")
    parser.add_argument("--top_k", type=int, default=5)
    parser.add_argument("--projection_dim", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run = Path(args.run_dir)

    corpus = corpus_mod.generate(args.num_facts, seed=args.seed, num_passages=args.num_passages)
    paths = corpus_mod.write(corpus, run / "data")
    print(
        f"{args.num_facts} facts, {len(corpus.docs)} training documents "
        f"({', '.join(f'{v} {k}' for k, v in corpus.meta['docs_by_kind'].items())})"
    )
    with contextlib.redirect_stdout(sys.stderr):  # the trainer's logs
        info = train(run / "data", run / "model", epochs=args.epochs, seed=args.seed, threads=1)
    recall = f"recalls {info['recall']:.0%} of the facts (chance {info['chance']:.0%})"
    if info["chance"] >= 1:  # a single candidate object per relation: recall says nothing
        recall = f"reproduces {info['exact_match']:.0%} of the answers greedily"
    print(f"trained {info['steps']} steps in {info['train_s']:.0f}s: the model {recall}")

    print(f"$ bergson trackstar {run / 'trackstar'} --model {run / 'model'} ... (see the docstring)")
    store = trackstar(
        TrackstarConfig(
            run_path=str(run / "trackstar"),
            model=str(run / "model"),
            precision="fp32",
            device="cpu",
            data=DataConfig(dataset=str(paths["train"])),
            query=DataConfig(
                dataset=str(paths["queries"]), prompt_column="prompt", completion_column="completion"
            ),
            optimizer_state=str(run / "model" / "optimizer.pt"),
            projection_dim=args.projection_dim,
            stats_documents=None,
            overwrite=True,
        )
    )
    scores = np.full((len(corpus.docs), len(corpus.queries)), -np.inf)
    scores[store.rows["row_id"]] = np.asarray(store["scores"], np.float64)

    k = args.top_k
    found, ranks = 0, []
    for j, q in enumerate(corpus.queries):
        order = np.argsort(-scores[:, j], kind="stable")
        relevant = set(q["relevant"])
        first = next(r for r, d in enumerate(order, 1) if int(d) in relevant)
        ranks.append(first)
        found += first <= k
        print(f"\n{q['prompt']}{q['completion']}   (first true source at rank {first})")
        for r, d in enumerate(order[:k], 1):
            mark = "*" if int(d) in relevant else " "
            doc = corpus.docs[int(d)]
            print(f"  {mark} {r}. {scores[d, j]:+.3f}  [{doc['kind']}] {doc['text'][:90]}")
    n, m = len(corpus.docs), len(corpus.queries)
    chance = float(
        np.mean(
            [1 - np.prod([(n - len(q["relevant"]) - i) / (n - i) for i in range(k)]) for q in corpus.queries]
        )
    )
    summary = {
        "facts": m,
        "documents": n,
        "top_k": k,
        "source_in_top_k": found,
        "share": round(found / m, 3),
        "chance": round(chance, 3),
        "mrr": round(float(np.mean([1 / r for r in ranks])), 3),
    }
    print(f"\na true source is in the top {k} for {found} of {m} facts (chance {chance:.0%})")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
