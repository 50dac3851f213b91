"""``bergson query``: compute a query's gradient and list the training rows that explain it."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .collect.loop import collect_gradients
from .config import DataConfig, QueryConfig
from .data import load_data, tokenize_documents
from .errors import BergsonError
from .models import load_model
from .search.attributor import Attributor

logger = logging.getLogger(__name__)

OUTPUT_SUFFIXES = (".jsonl", ".csv", ".parquet")


class QueryEngine:
    """Holds the store, the model and the training texts; answers queries."""

    def __init__(self, cfg: QueryConfig):
        if not cfg.index:
            raise BergsonError("--index is required: the gradient store to search")
        if cfg.top_k < 1:
            raise BergsonError(f"--top_k {cfg.top_k}: must be at least 1")
        if cfg.output and not cfg.output.endswith(OUTPUT_SUFFIXES):
            raise BergsonError(f"--output {cfg.output}: use a .jsonl, .csv or .parquet file name")
        self.cfg = cfg
        faiss_cfg = cfg.faiss if cfg.search == "faiss" else None
        self.attr = Attributor(
            cfg.index,
            unit_norm=cfg.unit_norm,
            faiss_cfg=faiss_cfg,
            modules=cfg.modules or None,
            preconditioner_path=cfg.preconditioner_path,
        )
        manifest = self.attr.manifest
        model_name = cfg.model or manifest.model["name"]
        revision = cfg.revision or (manifest.model.get("revision") if not cfg.model else None)
        opts = QueryConfig(**{**vars(cfg), "model": model_name, "revision": revision})
        self.model, self.tokenizer = load_model(opts)
        self.max_tokens = int(manifest.data.get("max_tokens") or 2048)
        self.loss_reduction = manifest.loss.get("reduction", "sum")
        self._texts: list[str] | None = None

    # ------------------------------------------------------------------ texts
    def training_text(self, row_id: int) -> str:
        """A snippet of the training document (from the dataset recorded in the manifest)."""
        if self._texts is None:
            data = self.attr.manifest.data
            try:
                dcfg = DataConfig(**{k: v for k, v in data.items() if k in DataConfig.__dataclass_fields__})
                ds = load_data(dcfg, option="the store's dataset")
                self._texts = [str(t) for t in ds[dcfg.prompt_column]]
            except (BergsonError, KeyError) as e:
                logger.warning("training texts unavailable (%s); hits show row ids only", e)
                self._texts = []
        if 0 <= row_id < len(self._texts):
            return " ".join(self._texts[row_id].split())[: self.cfg.snippet_chars]
        return ""

    # ------------------------------------------------------------------ queries
    def vectors(self, ds: Any, column: str, completion: str | None) -> tuple[np.ndarray, list[str]]:
        """Query vectors made like the store's rows, and the store modules they cover."""
        dcfg = DataConfig(prompt_column=column, completion_column=completion, truncation=True)
        docs = tokenize_documents(ds, self.tokenizer, dcfg, self.max_tokens)
        empty = np.flatnonzero(docs.num_loss_tokens() == 0)
        if len(empty):
            raise BergsonError(
                f"query {int(empty[0])} is empty or has a single token: there is no next-token loss to explain"
            )
        coll = self.attr.collector_for(self.model)
        sink = collect_gradients(
            self.model,
            docs,
            modules=coll.modules,
            projection_dim=coll.projection_dim,
            seed=coll.seed,
            include_bias=coll.include_bias,
            normalizers=coll.normalizers,
            token_batch_size=max(self.max_tokens, 2),
            loss_reduction=self.loss_reduction,
            pad_token_id=self.tokenizer.pad_token_id or 0,
            progress=False,
            heads=coll.heads,
        )
        return sink.vectors, list(coll.dims)

    def run(self, texts: list[str]) -> list[dict[str, Any]]:
        from datasets import Dataset

        if not texts:
            raise BergsonError("no query given")
        return self.run_dataset(Dataset.from_dict({"text": texts}), "text", None)

    def run_dataset(self, ds: Any, column: str, completion: str | None) -> list[dict[str, Any]]:
        vecs, modules = self.vectors(ds, column, completion)
        scores, idx = self.attr.search(vecs, self.cfg.top_k, reverse=self.cfg.reverse, modules=modules)
        rows = self.attr.store.rows["row_id"]
        hits = []
        for q in range(len(vecs)):
            for rank in range(scores.shape[1]):
                row = int(rows[int(idx[q, rank])])
                hits.append(
                    {
                        "query": q,
                        "rank": rank + 1,
                        "row_id": row,
                        "score": float(scores[q, rank]),
                        "text": self.training_text(row),
                    }
                )
        return hits


def print_hits(hits: Iterable[dict[str, Any]], queries: list[str] | None = None, file: Any = None) -> None:
    out = file or sys.stdout
    current = None
    for h in hits:
        if h["query"] != current:
            current = h["query"]
            label = repr(queries[current][:80]) if queries and current < len(queries) else ""
            print(f"query {current} {label}", file=out)
        print(f"  {h['rank']:3d}. score {h['score']:+.4g}  row {h['row_id']:6d}  {h['text'][:100]}", file=out)


def write_hits(path: str, hits: list[dict[str, Any]]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix == ".jsonl":
        p.write_text("".join(json.dumps(h) + "\n" for h in hits))
        return
    import pyarrow as pa

    table = pa.Table.from_pylist(hits) if hits else pa.table({})
    if p.suffix == ".csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, p)
    else:
        import pyarrow.parquet as pq

        pq.write_table(table, p)


def query(cfg: QueryConfig) -> list[dict[str, Any]]:
    """Run ``bergson query``; returns the hits (also printed, and written with --output)."""
    if cfg.query is not None and cfg.query_dataset:
        raise BergsonError("give either --query or --query_dataset, not both")
    if cfg.query is not None and not cfg.query.strip():
        raise BergsonError("--query is empty: give a text to explain")
    engine = QueryEngine(cfg)
    print(
        f"scores: positive = training on the row lowers the query's loss{' (cosine)' if cfg.unit_norm else ''}"
    )
    if cfg.query is None and not cfg.query_dataset:
        return interactive(engine)
    if cfg.query is not None:
        texts = [cfg.query]
        hits = engine.run(texts)
    else:
        ds = load_data(
            DataConfig(dataset=cfg.query_dataset or "", split=cfg.query_split), option="--query_dataset"
        )
        texts = [str(t) for t in ds[cfg.query_column]] if cfg.query_column in ds.column_names else None
        hits = engine.run_dataset(ds, cfg.query_column, cfg.query_completion_column)
    print_hits(hits, texts)
    if cfg.output:
        write_hits(cfg.output, hits)
        print(f"wrote {len(hits)} hits to {cfg.output}")
    return hits


def interactive(engine: QueryEngine) -> list[dict[str, Any]]:
    """A prompt loop: type a text, see the top-k training rows; an empty line or EOF quits."""
    all_hits: list[dict[str, Any]] = []
    while True:
        try:
            text = input("query> ")
        except EOFError:
            break
        if not text.strip():
            break
        try:
            hits = engine.run([text])
        except BergsonError as e:
            print(f"error: {e}")
            continue
        print_hits(hits, [text])
        all_hits += hits
    return all_hits
