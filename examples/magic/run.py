"""MAGIC on a tiny fine-tune: which training documents lowered (or raised) a query's loss?

Runs ``bergson magic`` on the recipe in ``examples/magic/tiny.yaml`` (a fine-tune of the shipped
tiny model on documents of the shipped corpus), then, for each query, prints the documents with
the highest scores (training on them lowered the query's loss the most) and the lowest (they
raised it), with the tokens of the top document that carried most of its score.

MAGIC scores are exact derivatives of the final query loss with respect to each document's
weight, so they predict what retraining without a document does. ``--check`` tests that
prediction: it retrains the same recipe (same order, batches and steps) without the top-k
documents, then without the bottom-k, and prints predicted and measured loss changes.

    python examples/magic/run.py                                   # the full recipe (minutes)
    python examples/magic/run.py --num_docs 16 --epochs 1 --num_queries 1 --check   # a small slice

The same from the shell: ``bergson magic examples/magic/tiny.yaml`` and
``bergson validate RUN/validate --recipe RUN --scores RUN/scores``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from bergson import MagicConfig, load_data, magic
from bergson.config import load_yaml
from bergson.validation import Retrainer

ROOT = Path(__file__).resolve().parents[2]


def snippet(text: str, n: int = 80) -> str:
    return " ".join(str(text).split())[:n]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(Path(__file__).with_name("tiny.yaml")))
    parser.add_argument("--run_dir", default=None, help="output directory (default: the config's run_path)")
    parser.add_argument("--num_docs", type=int, default=None, help="train on the first N documents only")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    parser.add_argument("--num_queries", type=int, default=None, help="attribute the first N queries only")
    parser.add_argument("--top_k", type=int, default=3, help="documents shown at each end")
    parser.add_argument(
        "--check", action="store_true", help="retrain without the top-k and the bottom-k documents"
    )
    args = parser.parse_args()

    cfg = load_yaml(MagicConfig, args.config)
    # paths in the shipped recipe are relative to the repository root
    cfg.model = str(ROOT / cfg.model) if (ROOT / cfg.model).exists() else cfg.model
    data, query = cfg.data, cfg.query
    if (ROOT / data.dataset).exists():
        data = replace(data, dataset=str(ROOT / data.dataset))
    if (ROOT / query.dataset).exists():
        query = replace(query, dataset=str(ROOT / query.dataset))
    if args.num_docs:
        data = replace(data, split=f"train[:{args.num_docs}]")
    if args.num_queries:
        query = replace(query, split=f"train[:{args.num_queries}]")
    training = replace(cfg.training, epochs=args.epochs) if args.epochs else cfg.training
    cfg = replace(cfg, data=data, query=query, training=training, run_path=args.run_dir or cfg.run_path)

    print(f"$ bergson magic {args.config} --run_path {cfg.run_path} --split '{data.split}'")
    store = magic(cfg)
    scores = np.asarray(store["scores"], np.float64)  # [documents, queries]
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    docs = load_data(cfg.data)
    queries = load_data(cfg.query)
    text_col = cfg.data.prompt_column
    timings = json.loads((Path(cfg.run_path) / "timings.json").read_text())
    print(
        f"trained {timings['steps']} steps on {len(docs)} documents "
        f"(loss {timings['first_loss']:.3f} -> {timings['last_loss']:.3f}); "
        "score = -d(query loss)/d(document weight), positive = the document lowered the loss\n"
    )

    retrainer = Retrainer(cfg, Path(cfg.run_path) / "retrains", device=cfg.device) if args.check else None
    base = retrainer.query_losses(np.array([], np.int64)) if retrainer else None
    k = args.top_k
    for j in range(scores.shape[1]):
        col = scores[:, j]
        order = np.argsort(-col, kind="stable")
        row = queries[j]
        print(
            f"query {j}: {snippet(row.get('prompt') or row['text'])!r} -> {snippet(row.get('completion', ''))!r}"
        )
        print("  most helpful (removing them would raise the loss):")
        for i in order[:k]:
            print(f"    {col[i]:+.4f}  doc {i:4d}  {snippet(docs[int(i)][text_col])}")
        print("  most harmful (removing them would lower the loss):")
        for i in order[::-1][:k]:
            print(f"    {col[i]:+.4f}  doc {i:4d}  {snippet(docs[int(i)][text_col])}")
        if cfg.per_token:
            top = int(order[0])
            tok = np.asarray(store.token_rows(top), np.float64)[:, j]
            ids = tokenizer(docs[top][text_col])["input_ids"][: len(tok)]
            shown = "  ".join(f"{tokenizer.decode([ids[t]])!r} {tok[t]:+.4f}" for t in np.argsort(-tok)[:5])
            print(f"  tokens of doc {top} carrying most of its score: {shown}")
        if retrainer is not None and base is not None:
            for label, removed in (("top", order[:k]), ("bottom", order[::-1][:k])):
                measured = float(retrainer.query_losses(np.sort(removed))[j] - base[j])
                predicted = float(col[removed].sum())
                print(
                    f"  retrained without the {label}-{k}: loss change measured {measured:+.5f}, "
                    f"predicted {predicted:+.5f}"
                )
        print()


if __name__ == "__main__":
    main()
