"""The built-in offline example: which training documents explain a query?

Builds a gradient store over the shipped corpus with the shipped tiny Pythia-style
model (the same as ``bergson build``), computes the gradient of each shipped query the
same way, and prints the training documents whose gradients point the same way
(cosine similarity; positive = training on the document lowers the query's loss).

    python examples/quickstart.py [--run_dir runs/quickstart] [--num_docs N]
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

from bergson import (
    Attributor,
    DataConfig,
    IndexConfig,
    InMemorySink,
    build,
    collect_gradients,
    load_model,
    tokenize_documents,
)
from bergson.data import load_data

ASSETS = Path(__file__).resolve().parents[1] / "bergson" / "assets"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run_dir", default="runs/quickstart")
    parser.add_argument("--num_docs", type=int, default=None, help="use only the first N corpus documents")
    parser.add_argument("--top_k", type=int, default=3)
    args = parser.parse_args()

    split = f"train[:{args.num_docs}]" if args.num_docs else "train"
    cfg = IndexConfig(
        run_path=str(Path(args.run_dir) / "index"),
        model=str(ASSETS / "tiny-pythia"),
        data=DataConfig(dataset=str(ASSETS / "corpus.jsonl.gz"), split=split, truncation=True),
        token_batch_size=4096,
        projection_dim=16,
    )
    print(
        f"$ bergson build {cfg.run_path} --model {cfg.model} --dataset {cfg.data.dataset} "
        f"--split '{split}' --truncation --token_batch_size 4096 --projection_dim 16"
    )
    start = time.perf_counter()
    store = build(cfg)
    print(f"built {store!r} in {time.perf_counter() - start:.1f}s\n")

    # Query gradients made exactly like the store's rows, then a cosine search of the store
    # (the same as `bergson query --index ... --query_dataset queries.jsonl --unit_norm`).
    model, tokenizer = load_model(cfg)
    qcfg = DataConfig(dataset=str(ASSETS / "queries.jsonl"))
    queries = load_data(qcfg)
    qdocs = tokenize_documents(queries, tokenizer, qcfg, int(cfg.token_batch_size))
    qvec = InMemorySink(len(qdocs), store.dims)
    collect_gradients(
        model,
        qdocs,
        sink=qvec,
        modules=list(store.modules),
        projection_dim=cfg.projection_dim,
        seed=cfg.projection_seed,
        progress=False,
    )
    scores, rows = Attributor(cfg.run_path, unit_norm=True).search(qvec.vectors, args.top_k)

    with gzip.open(cfg.data.dataset, "rt") as f:
        corpus = [json.loads(line) for line in f]
    for i, row in enumerate(queries):
        print(f"query {i}: {row['text']!r}")
        for rank, (value, j) in enumerate(zip(scores[i].tolist(), rows[i].tolist()), 1):
            doc = corpus[int(store.rows["row_id"][j])]
            snippet = " ".join(doc["text"].split())[:90]
            print(f"  {rank}. score {value:+.3f}  row {j:4d}  [{doc['source']}]  {snippet}...")
        print()


if __name__ == "__main__":
    main()
