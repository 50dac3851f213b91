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
from .data.tokenize import document_tokenizer
from .errors import BergsonError
from .models import honours_numerics, load_model
from .search.attributor import Attributor

logger = logging.getLogger(__name__)

OUTPUT_SUFFIXES = (".jsonl", ".csv", ".parquet")
TOP_TOKENS = 5
TOKEN_CACHE_ROWS = 20_000


def documents_tokens(
    ds: Any, dcfg: DataConfig, tokenizer: Any, max_tokens: int, row_ids: Iterable[int]
) -> dict[int, list[str]]:
    """The token strings of dataset rows ``row_ids`` as a store built with ``dcfg`` saw them,
    tokenized together (rows that cannot be read are left out, with a warning)."""
    rows = sorted({int(r) for r in row_ids if 0 <= int(r) < len(ds)})
    if not rows:
        return {}
    try:
        docs = tokenize_documents(ds.select(rows), tokenizer, dcfg, max_tokens)
    except (BergsonError, KeyError, IndexError) as e:
        logger.warning("training tokens unavailable (%s)", e)
        return {}
    return {r: [tokenizer.decode([int(t)]) for t in ids] for r, ids in zip(rows, docs.input_ids)}


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
            unit_norm=cfg.unit_normalize,
            faiss_cfg=faiss_cfg,
            modules=cfg.modules or None,
            preconditioner_path=cfg.preconditioner_path,
            int8_rerank=cfg.int8_rerank,
            int8_prefilter=cfg.int8_prefilter,
        )
        manifest = self.attr.manifest
        model_name = cfg.model or manifest.model["name"]
        revision = cfg.revision or (manifest.model.get("revision") if not cfg.model else None)
        opts = QueryConfig(**{**vars(cfg), "model": model_name, "revision": revision})
        self.model, self.tokenizer = load_model(opts)
        # queries are tokenized and rendered as the store's documents were (--tokenizer, --chat_template)
        self.stored = DataConfig.from_manifest(manifest.data)
        self.tokenizer = document_tokenizer(self.stored, self.tokenizer)
        self.max_tokens = int(manifest.data.get("max_tokens") or 2048)
        self.loss_reduction = manifest.loss.get("reduction", "sum")
        self._texts: list[str] | None = None
        self._dataset: Any = None
        self._tokens: dict[int, list[str] | None] = {}
        self.modules: list[str] = []

    # ------------------------------------------------------------------ texts
    def training_text(self, row_id: int) -> str:
        """A snippet of the training document (from the dataset recorded in the manifest)."""
        return " ".join(self.document_text(row_id).split())[: self.cfg.snippet_chars]

    def document_text(self, row_id: int) -> str:
        """The whole training document ("" when the store's dataset cannot be read)."""
        if self._texts is None:
            try:
                dcfg, ds = self.training_data()
                self._texts = [str(t) for t in ds[dcfg.prompt_column]]
            except (BergsonError, KeyError) as e:
                logger.warning("training texts unavailable (%s); hits show row ids only", e)
                self._texts = []
        return self._texts[row_id] if 0 <= row_id < len(self._texts) else ""

    # ------------------------------------------------------------------ queries
    def vectors(
        self, ds: Any, column: str, completion: str | None
    ) -> tuple[np.ndarray, list[str], Any, list[Any]]:
        """Query vectors made like the store's rows, the store modules they cover, the tokenized
        queries and (with --per_token) each query's token vectors."""
        dcfg = DataConfig(
            prompt_column=column,
            completion_column=completion,
            truncation=True,
            chat_template=self.stored.chat_template,
        )
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
            per_token=self.cfg.per_token,
            aggregate_experts=coll.aggregate_experts,
        )
        return sink.vectors, list(coll.dims), docs, sink.tokens  # type: ignore[attr-defined]

    def training_data(self) -> tuple[DataConfig, Any]:
        """The store's data options and its dataset, loaded once."""
        dcfg = DataConfig.from_manifest(self.attr.manifest.data)
        if self._dataset is None:
            self._dataset = load_data(dcfg, option="the store's dataset")
        return dcfg, self._dataset

    def training_tokens(self, row_id: int, expected: int) -> list[str] | None:
        """The token strings of a training document as the store saw them (None when the
        dataset is unavailable or tokenizes to another length than the store recorded)."""
        if row_id not in self._tokens:
            self.prefetch_tokens([row_id])
        words = self._tokens.get(row_id)
        return words if words is not None and len(words) == expected else None

    def prefetch_tokens(self, row_ids: Iterable[int]) -> None:
        """Tokenize training documents in one call and keep their token strings."""
        todo = [r for r in row_ids if r not in self._tokens]
        if not todo:
            return
        if len(self._tokens) > TOKEN_CACHE_ROWS:  # a long-running server keeps a bounded cache
            self._tokens.clear()
        try:
            dcfg, ds = self.training_data()
        except (BergsonError, KeyError) as e:
            logger.warning("training tokens unavailable (%s)", e)
            self._tokens.update(dict.fromkeys(todo))
            return
        found = documents_tokens(ds, dcfg, self.tokenizer, self.max_tokens, todo)
        self._tokens.update({r: found.get(r) for r in todo})

    def explain(
        self, hit: dict[str, Any], index: int, query: np.ndarray, tokens: Any, qtext: list[str]
    ) -> None:
        """Add the hit's per-token split (training document and query) to ``hit``."""
        doc, q = self.attr.explain(query, index, query_tokens=tokens, modules=self.modules)
        if doc is not None:
            words = self.training_tokens(hit["row_id"], len(doc)) or [""] * len(doc)
            hit["tokens"] = [
                {"position": t, "token": w, "score": float(s)} for t, (w, s) in enumerate(zip(words, doc))
            ]
        if q is not None:
            hit["query_tokens"] = [
                {"position": t, "token": w, "score": float(s)} for t, (w, s) in enumerate(zip(qtext, q))
            ]

    def run(self, texts: list[str]) -> list[dict[str, Any]]:
        from datasets import Dataset

        if not texts:
            raise BergsonError("no query given")
        return self.run_dataset(Dataset.from_dict({"text": texts}), "text", None)

    def run_dataset(self, ds: Any, column: str, completion: str | None) -> list[dict[str, Any]]:
        vecs, modules, qdocs, qtokens = self.vectors(ds, column, completion)
        return self.hits(vecs, modules, qdocs, qtokens, reverse=self.cfg.reverse)

    def hits(
        self, vecs: np.ndarray, modules: list[str], qdocs: Any, qtokens: list[Any], *, reverse: bool
    ) -> list[dict[str, Any]]:
        """The top-k hit records of query vectors made by :meth:`vectors` (the most negative
        scores with ``reverse``)."""
        self.modules = modules
        scores, idx = self.attr.search(vecs, self.cfg.top_k, reverse=reverse, modules=modules)
        rows = self.attr.store.rows["row_id"]
        if self.cfg.per_token and self.attr.store.has_tokens:
            self.prefetch_tokens(int(rows[int(i)]) for i in idx.reshape(-1) if int(i) >= 0)
        hits = []
        for q in range(len(vecs)):
            for rank in range(scores.shape[1]):
                row = int(rows[int(idx[q, rank])])
                hit = {
                    "query": q,
                    "rank": rank + 1,
                    "row_id": row,
                    "score": float(scores[q, rank]),
                    "text": self.training_text(row),
                }
                if self.cfg.per_token:
                    qtext = [self.tokenizer.decode([int(t)]) for t in qdocs.input_ids[q]]
                    self.explain(hit, int(idx[q, rank]), vecs[q], qtokens[q], qtext)
                hits.append(hit)
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
        for key, label in (("tokens", "training tokens"), ("query_tokens", "query tokens")):
            if key in h:
                top = sorted(h[key], key=lambda t: -t["score"])[:TOP_TOKENS]
                shown = "  ".join(f"{t['token']!r}@{t['position']} {t['score']:+.3g}" for t in top)
                print(f"         {label}: {shown}", file=out)


RECORD_COLUMNS = ("query", "direction", "result", "result_index", "score")


def record_hits(
    path: str, text: str, top: list[dict[str, Any]], bottom: list[dict[str, Any]], document: Any
) -> None:
    """Append one query's hits (with the whole ``document(row_id)`` texts) to the --record CSV (a header first when the file is new), flushed
    at once so that an interrupted session keeps every answered query."""
    import csv

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    new = not p.is_file() or p.stat().st_size == 0
    with p.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(RECORD_COLUMNS)
        for direction, hits in (("Top", top), ("Bottom", bottom)):
            for h in hits:
                writer.writerow([text, direction, document(h["row_id"]), h["row_id"], h["score"]])


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

        # CSV has no nested values: per-token lists are written as JSON text
        flat = [{k: json.dumps(v) if isinstance(v, list) else v for k, v in h.items()} for h in hits]
        pacsv.write_csv(pa.Table.from_pylist(flat) if hits else table, p)
    else:
        import pyarrow.parquet as pq

        pq.write_table(table, p)


@honours_numerics
def query(cfg: QueryConfig) -> list[dict[str, Any]]:
    """Run ``bergson query``; returns the hits (also printed, and written with --output)."""
    if cfg.query is not None and cfg.query_dataset:
        raise BergsonError("give either --query or --query_dataset, not both")
    if cfg.query is not None and not cfg.query.strip():
        raise BergsonError("--query is empty: give a text to explain")
    engine = QueryEngine(cfg)
    print(
        f"scores: positive = training on the row lowers the query's loss{' (cosine)' if cfg.unit_normalize else ''}"
    )
    if cfg.query is None and not cfg.query_dataset:
        return interactive(engine)
    if cfg.query is not None:
        from datasets import Dataset

        ds, column, completion = Dataset.from_dict({"text": [cfg.query]}), "text", None
    else:
        ds = load_data(
            DataConfig(dataset=cfg.query_dataset or "", split=cfg.query_split), option="--query_dataset"
        )
        column, completion = cfg.query_column, cfg.query_completion_column
    texts = [str(t) for t in ds[column]] if column in ds.column_names else None
    found = engine.vectors(ds, column, completion)
    hits = engine.hits(*found, reverse=cfg.reverse)
    if cfg.record:
        bottom = engine.hits(*found, reverse=not cfg.reverse)
        for q in range(len(found[0])):
            top, low = ([h for h in hs if h["query"] == q] for hs in (hits, bottom))
            record_hits(cfg.record, texts[q] if texts else str(q), top, low, engine.document_text)
        print(f"appended the top and bottom {cfg.top_k} hits of each query to {cfg.record}")
    print_hits(hits, texts)
    if cfg.output:
        write_hits(cfg.output, hits)
        print(f"wrote {len(hits)} hits to {cfg.output}")
    return hits


QUIT = ("exit", "quit")
"""Words that end the interactive prompt (as an empty line or end of input do)."""


def interactive(engine: QueryEngine) -> list[dict[str, Any]]:
    """A prompt loop: type a text, see the top-k training rows and the bottom k (the other end of
    the ranking); an empty line, ``exit``, ``quit`` or EOF ends it. Returns the top hits."""
    from datasets import Dataset

    all_hits: list[dict[str, Any]] = []
    while True:
        try:
            text = input("query> ")
        except EOFError:
            break
        if not text.strip() or text.strip().lower() in QUIT:
            break
        try:
            found = engine.vectors(Dataset.from_dict({"text": [text]}), "text", None)
            top = engine.hits(*found, reverse=engine.cfg.reverse)
            bottom = engine.hits(*found, reverse=not engine.cfg.reverse)
        except BergsonError as e:
            print(f"error: {e}")
            continue
        print_hits(top, [text])
        print("  ... and the other end of the ranking:")
        print_hits(bottom)
        if engine.cfg.record:
            record_hits(engine.cfg.record, text, top, bottom, engine.document_text)
        all_hits += top
    return all_hits
