"""Per-attention-head attribution: which heads, and which tokens, tie a query to a training document?

Builds a gradient store of the shipped tiny Pythia model's attention layers over the shipped
corpus with ``--attention_heads``: the fused query/key/value projection and the output
projection of each layer are stored as one block per head (``...query_key_value.head2``), each
with its own random projection, and ``--per_token`` keeps every token's share of each document.
Then, for a query, ``bergson query --per_token`` finds the top training document and splits its
score over the tokens of both texts, and the score is split over heads: the score is a sum of
per-block inner products, so each head's share is its blocks' inner product.

    python examples/per_head.py                        # 300 documents
    python examples/per_head.py --num_docs 24          # a small slice

The store is the same as
``bergson build RUN --model bergson/assets/tiny-pythia --dataset bergson/assets/corpus.jsonl.gz
--truncation --max_length 128 --modules '*.attention.*' --per_token --attention_heads
'*.query_key_value=4:48:out' '*.dense=4:16:in'``.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
from datasets import Dataset

from bergson import (
    Attributor,
    DataConfig,
    IndexConfig,
    QueryConfig,
    build,
    collect_gradients,
    load_model,
    query,
    tokenize_documents,
)

ASSETS = Path(__file__).resolve().parents[1] / "bergson" / "assets"
# tiny-pythia: 4 heads of size 16; GPT-NeoX groups the fused qkv rows per head (3 x 16 each),
# and the output projection's 64 inputs are the 4 heads side by side
HEADS = ["*.query_key_value=4:48:out", "*.dense=4:16:in"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run_dir", default="runs/per_head")
    parser.add_argument("--num_docs", type=int, default=300, help="the first N corpus documents")
    parser.add_argument("--query", type=int, default=4, help="which of the shipped queries to explain")
    parser.add_argument("--projection_dim", type=int, default=8)
    args = parser.parse_args()

    cfg = IndexConfig(
        run_path=str(Path(args.run_dir) / "index"),
        model=str(ASSETS / "tiny-pythia"),
        precision="fp32",
        device="cpu",
        data=DataConfig(
            dataset=str(ASSETS / "corpus.jsonl.gz"),
            split=f"train[:{args.num_docs}]",
            truncation=True,
            max_length=128,
        ),
        modules=["*.attention.*"],
        attention_heads=HEADS,
        per_token=True,
        projection_dim=args.projection_dim,
        save_dtype="float32",
    )
    store = build(cfg)
    print(f"built {store!r}\n")
    queries = [json.loads(line) for line in (ASSETS / "queries.jsonl").read_text().splitlines()]
    text = queries[args.query]["text"]

    # the top training document, with per-token splits of its score (printed by bergson query)
    print(f"$ bergson query --index {cfg.run_path} --query '...' --top_k 1 --per_token")
    (hit,) = query(QueryConfig(index=cfg.run_path, query=text, top_k=1, per_token=True, device="cpu"))
    row = int(np.flatnonzero(store.rows["row_id"] == hit["row_id"])[0])

    # the query's vector, made like the store's rows, and the score split over blocks
    model, tokenizer = load_model(cfg)
    coll = Attributor(cfg.run_path).collector_for(model)
    qdocs = tokenize_documents(
        Dataset.from_dict({"text": [text]}), tokenizer, DataConfig(truncation=True), 2048
    )
    qvec = collect_gradients(
        model,
        qdocs,
        modules=coll.modules,
        projection_dim=coll.projection_dim,
        seed=coll.seed,
        heads=coll.heads,
        progress=False,
    ).vectors[0]  # type: ignore[attr-defined]
    shares: dict[str, float] = {}
    start = 0
    for name, dim in coll.dims.items():
        part = float(np.dot(qvec[start : start + dim], np.asarray(store[name][row], np.float64)))
        start += dim
        m = re.match(r"gpt_neox\.layers\.(\d+)\.attention\.\w+\.head(\d+)$", name)
        head = f"layer {m.group(1)} head {m.group(2)}" if m else name
        shares[head] = shares.get(head, 0.0) + part
    total = sum(shares.values())
    print(f"\nquery {args.query}: {text[:90]!r}")
    print(f"top document: row {hit['row_id']}, score {hit['score']:+.4g} (sum over heads {total:+.4g})")
    print("heads by their share of the score (q/k/v and output projection together):")
    for head, value in sorted(shares.items(), key=lambda kv: -abs(kv[1])):
        print(f"  {head}: {value:+.4g}  ({value / total:+.0%})")
    print("training-document tokens carrying most of the score:")
    for t in sorted(hit["tokens"], key=lambda t: -t["score"])[:5]:
        print(f"  {t['token']!r} at {t['position']}: {t['score']:+.4g}")
    print("query tokens carrying most of the score:")
    for t in sorted(hit["query_tokens"], key=lambda t: -t["score"])[:5]:
        print(f"  {t['token']!r} at {t['position']}: {t['score']:+.4g}")
    top = max(shares, key=lambda h: shares[h])
    print(
        json.dumps(
            {
                "row_id": hit["row_id"],
                "score": hit["score"],
                "head_sum": total,
                "token_sum": sum(t["score"] for t in hit["tokens"]),
                "query_token_sum": sum(t["score"] for t in hit["query_tokens"]),
                "top_head": top,
                "heads": shares,
            }
        )
    )


if __name__ == "__main__":
    main()
