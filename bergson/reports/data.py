"""The data a report shows, gathered from a scores store or from query results.

Both sources become one plain, JSON-ready structure (a *page*):

- ``docs``: training documents by dataset row id, each with its text and (where known) the
  token strings the store saw;
- ``queries``: per query (or score column) its text, its proponents (positive scores, best
  first) and opponents (negative scores, most negative first), each hit with its score and,
  where available, its per-token split, and a histogram of the scores;
- ``manifest``: a summary of how the scores were made, and the full manifest.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DataConfig
from ..errors import BergsonError
from ..store import GradientStore, load_gradients
from ..store.manifest import MANIFEST, SCORE_ORIENTATION, Manifest

logger = logging.getLogger(__name__)

HIT_SUFFIXES = (".jsonl", ".csv", ".parquet")


def r4(x: float) -> float:
    """A float rounded to 4 significant digits (keeps the page small)."""
    return float(f"{float(x):.4g}")


def r4s(values: Iterable[float]) -> list[float]:
    return [r4(v) for v in values]


def histogram(scores: np.ndarray, bins: int) -> dict[str, Any] | None:
    """Counts of ``bins`` equal-width bins between the lowest and the highest score."""
    s = np.asarray(scores, np.float64)
    s = s[np.isfinite(s)]
    if not len(s):
        return None
    counts, edges = np.histogram(s, bins=max(int(bins), 1))
    return {"lo": r4(edges[0]), "hi": r4(edges[-1]), "counts": counts.tolist(), "n": len(s)}


def empty_page(title: str, collapse_chars: int) -> dict[str, Any]:
    return {
        "title": title,
        "orientation": SCORE_ORIENTATION,
        "collapse_chars": collapse_chars,
        "manifest": None,
        "docs": {},
        "queries": [],
        "live": False,
    }


# --------------------------------------------------------------------- manifest
def manifest_summary(manifest: Manifest, store: str) -> dict[str, Any]:
    """The fields a reader wants first: model, method, store, data."""
    score = manifest.score or {}
    method = score.get("kind") or ("scores" if manifest.kind == "scores" else "gradient search")
    if manifest.kind == "scores":
        method = f"{method} ({score.get('mode', 'individual')})"
    pre = manifest.preconditioner or {}
    summary = {
        "store": store,
        "kind": manifest.kind,
        "method": method,
        "model": manifest.model.get("name"),
        "revision": manifest.model.get("revision"),
        "dataset": manifest.data.get("dataset"),
        "rows": manifest.num_rows,
        "projection": manifest.projection.get("dim"),
        "normalizer": (manifest.normalizer or {}).get("kind"),
        "preconditioner": pre.get("path") or pre.get("kind"),
        "unit_normalize": manifest.unit_normalize or bool(score.get("unit_normalize")),
        "per_token": manifest.per_token,
        "orientation": score.get("orientation", SCORE_ORIENTATION),
        "non-finite rows": _rows_note(manifest.nonfinite, "stored as zeros"),
        "norm outliers": _rows_note(
            (manifest.norms or {}).get("outliers"),
            f"norm above {(manifest.norms or {}).get('outlier_factor')}x the median "
            f"{(manifest.norms or {}).get('median', 0):.4g}",
        ),
    }
    return {k: v for k, v in summary.items() if v is not None}


def _rows_note(record: dict[str, Any] | None, what: str) -> str | None:
    """'N rows (what): dataset rows i, j, ...' for a manifest's list of flagged rows (None when none)."""
    if not record or not record.get("count"):
        return None
    ids = list(record.get("row_ids") or [])
    shown = ", ".join(map(str, ids[:10])) + (", ..." if record["count"] > len(ids[:10]) else "")
    return f"{record['count']} rows ({what}): dataset rows {shown}"


def manifest_entry(manifest: Manifest, store: str) -> dict[str, Any]:
    full = asdict(manifest)
    full.pop("shards", None)
    return {"summary": manifest_summary(manifest, store), "full": full}


# --------------------------------------------------------------------- training texts
class TrainingTexts:
    """The texts and token strings of a store's training dataset (loaded once, on demand)."""

    def __init__(self, manifest: Manifest, tokenizer: Any = None):
        self.manifest = manifest
        self.dcfg = DataConfig.from_manifest(manifest.data)
        self.max_tokens = int(manifest.data.get("max_tokens") or 2048)
        self._tokenizer = tokenizer
        self._ds: Any = None
        self._failed = False

    def dataset(self) -> Any:
        if self._ds is None and not self._failed:
            from ..data import load_data

            try:
                self._ds = load_data(self.dcfg, option="the store's dataset")
            except BergsonError as e:
                logger.warning("training texts unavailable (%s); documents show row ids only", e)
                self._failed = True
        return self._ds

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.manifest.model)
        return self._tokenizer

    def text(self, row_id: int) -> str:
        ds = self.dataset()
        if ds is None or not 0 <= row_id < len(ds):
            return ""
        row = ds[int(row_id)]
        parts = [row.get(self.dcfg.prompt_column)]
        if self.dcfg.completion_column:
            parts.append(row.get(self.dcfg.completion_column))
        if self.dcfg.conversation_column and not parts[0]:
            parts = [json.dumps(row.get(self.dcfg.conversation_column), ensure_ascii=False)]
        return "".join(str(p) for p in parts if p is not None)

    def tokens(self, lengths: dict[int, int]) -> dict[int, list[str]]:
        """Token strings of the rows in ``lengths`` whose tokenization has the length the store
        recorded (the others are left out)."""
        from ..querying import documents_tokens

        ds = self.dataset()
        tok = self.tokenizer() if ds is not None else None
        if tok is None:
            return {}
        found = documents_tokens(ds, self.dcfg, tok, self.max_tokens, lengths)
        return {r: t for r, t in found.items() if len(t) == lengths[r]}


def load_tokenizer(model: dict[str, Any]) -> Any:
    """The tokenizer of the store's model (None, with a warning, when it cannot be loaded)."""
    from transformers import AutoTokenizer

    name = str(model.get("name") or "")
    local = os.path.isdir(os.path.expanduser(name))
    try:
        if local:
            return AutoTokenizer.from_pretrained(os.path.expanduser(name), local_files_only=True)
        return AutoTokenizer.from_pretrained(name, revision=model.get("revision"))
    except (OSError, ValueError) as e:
        logger.warning("the tokenizer of %s is unavailable (%s); documents are shown unshaded", name, e)
        return None


# --------------------------------------------------------------------- scores stores
def query_texts_of_scores(manifest: Manifest, columns: int) -> tuple[list[str], str]:
    """Texts of a scores store's columns, and how columns relate to queries (a label)."""
    from ..data import load_data

    score = manifest.score or {}
    texts: list[str] = []
    try:
        if score.get("query_path"):
            qstore = load_gradients(score["query_path"])
            dcfg = DataConfig.from_manifest(qstore.manifest.data)
            ds = load_data(dcfg, option="the query store's dataset")
            texts = [str(ds[int(r)][dcfg.prompt_column]) for r in qstore.rows["row_id"]]
        elif score.get("query_dataset"):
            ds = load_data(DataConfig(dataset=score["query_dataset"]), option="the query dataset")
            texts = [str(t) for t in ds["text"]] if "text" in ds.column_names else []
    except (BergsonError, KeyError, OSError) as e:
        logger.warning("query texts unavailable (%s); queries are shown by number", e)
    aggregated = score.get("query_aggregation", "none") != "none" or score.get("mode") in ("mean", "max")
    if columns == len(texts) and not aggregated:
        return texts, "query"
    if columns == 1 and texts:
        how = {"mean": "mean", "max": "max"}.get(str(score.get("mode")), score.get("query_aggregation"))
        label = f"{how} over {len(texts)} queries"
        return ["\n".join(texts)], label
    return [], "column"


def from_scores_store(
    store: GradientStore,
    *,
    top_k: int,
    bins: int,
    max_queries: int | None,
    texts: TrainingTexts,
    title: str,
    collapse_chars: int,
) -> dict[str, Any]:
    """A page of a scores store: per column, its top-k proponents and opponents."""
    from tqdm.auto import tqdm

    m = store.manifest
    s = np.asarray(store["scores"], np.float32)
    if (m.score or {}).get("kind") == "self_influence":
        return from_self_influence(store, s, top_k=top_k, bins=bins, texts=texts, title=title,
                                   collapse_chars=collapse_chars)  # fmt: skip
    ncols = s.shape[1] if s.ndim == 2 else 0
    shown = ncols if max_queries is None else min(ncols, max_queries)
    qtexts, how = query_texts_of_scores(m, ncols)
    row_ids = store.rows["row_id"]
    page = empty_page(title, collapse_chars)
    page["manifest"] = manifest_entry(m, str(store.root))
    needed: set[int] = set()
    for c in tqdm(range(shown), desc="report: queries", unit="query", disable=shown < 20):
        col = s[:, c]
        order = np.argsort(-col, kind="stable")
        hits = {}
        for side, idx in (("proponents", order[:top_k]), ("opponents", order[::-1][:top_k])):
            keep = [int(i) for i in idx if (col[i] > 0 if side == "proponents" else col[i] < 0)]
            hits[side] = [
                score_hit(store, i, c, int(row_ids[i]), float(col[i]), r) for r, i in enumerate(keep, 1)
            ]
            needed.update(int(row_ids[i]) for i in keep)
        label = f"{how} {c}" if how in ("query", "column") else how
        page["queries"].append(
            {
                "id": c,
                "label": label,
                "text": qtexts[c] if c < len(qtexts) else "",
                "tokens": None,
                **hits,
                "histogram": histogram(col, bins),
                "histogram_of": f"all {len(col)} training documents",
            }
        )
    lengths = dict(zip(row_ids.tolist(), store.rows["num_tokens"].tolist()))
    page["docs"] = training_docs(sorted(needed), texts, lengths if store.has_tokens else None)
    return page


def from_self_influence(
    store: GradientStore, s: np.ndarray, *, top_k: int, bins: int, texts: TrainingTexts, title: str,
    collapse_chars: int,
) -> dict[str, Any]:  # fmt: skip
    """A page of a self-influence store (``bergson self_influence``): one ranked list of the most
    self-influential documents, the least self-influential ones, and the histogram of all."""
    m = store.manifest
    score = m.score or {}
    col = s[:, 0]
    order = np.argsort(-col, kind="stable")
    row_ids = store.rows["row_id"]
    hits = {
        side: [score_hit(store, int(i), 0, int(row_ids[i]), float(col[i]), r) for r, i in enumerate(idx, 1)]
        for side, idx in (("proponents", order[:top_k]), ("opponents", order[::-1][:top_k]))
    }
    page = empty_page(title, collapse_chars)
    page["orientation"] = score.get("orientation", SCORE_ORIENTATION)
    page["manifest"] = manifest_entry(m, str(store.root))
    page["queries"].append(
        {
            "id": 0,
            "label": f"self-influence ({score.get('method')})",
            "text": f"Every document scored against itself; preconditioner: {score.get('preconditioner')}.",
            "tokens": None,
            **hits,
            "sides": {"proponents": "Most self-influential", "opponents": "Least self-influential"},
            "histogram": histogram(col, bins),
            "histogram_of": f"all {len(col)} documents",
        }
    )
    needed = sorted({h["row"] for side in hits.values() for h in side})
    lengths = dict(zip(row_ids.tolist(), store.rows["num_tokens"].tolist()))
    page["docs"] = training_docs(needed, texts, lengths if store.has_tokens else None)
    return page


def score_hit(store: GradientStore, index: int, column: int, row_id: int, score: float, rank: int) -> dict:
    hit: dict[str, Any] = {"row": row_id, "rank": rank, "score": r4(score)}
    if store.has_tokens:
        hit["token_scores"] = r4s(np.asarray(store.token_rows(index))[:, column])
    return hit


def training_docs(
    row_ids: Sequence[int], texts: TrainingTexts, lengths: dict[int, int] | None
) -> dict[str, dict[str, Any]]:
    """Text and (with ``lengths``: the token counts the store recorded) token strings per row."""
    tokens = texts.tokens({r: lengths[r] for r in row_ids}) if lengths is not None else {}
    return {str(r): {"text": texts.text(r), "tokens": tokens.get(r)} for r in row_ids}


# --------------------------------------------------------------------- query results
def read_hits(path: str) -> list[dict[str, Any]]:
    """The records `bergson query --output` wrote (.jsonl, .csv or .parquet)."""
    p = Path(path)
    if p.suffix == ".jsonl":
        try:
            return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise BergsonError(f"{path}: not a JSON-lines file of query results ({e})") from e
    if p.suffix == ".csv":
        import pyarrow.csv as pacsv

        rows = pacsv.read_csv(p).to_pylist()
        for r in rows:
            for key in ("tokens", "query_tokens"):
                if isinstance(r.get(key), str):
                    r[key] = json.loads(r[key])
        return rows
    import pyarrow.parquet as pq

    return pq.read_table(p).to_pylist()


def from_hits(
    hits: list[dict[str, Any]],
    *,
    bins: int,
    max_queries: int | None,
    query_texts: list[str] | None,
    texts: TrainingTexts | None,
    manifest: dict[str, Any] | None,
    title: str,
    collapse_chars: int,
) -> dict[str, Any]:
    """A page of query results: each query's hits, split by the sign of their score."""
    missing = {"query", "row_id", "score"} - set(hits[0]) if hits else set()
    if missing:
        raise BergsonError(
            f"the query results lack the fields {sorted(missing)}; pass a `bergson query --output` file"
        )
    page = empty_page(title, collapse_chars)
    page["manifest"] = manifest
    by_query: dict[int, list[dict[str, Any]]] = {}
    for h in hits:
        by_query.setdefault(int(h["query"]), []).append(h)
    ids = sorted(by_query)[:max_queries] if max_queries is not None else sorted(by_query)
    docs: dict[str, dict[str, Any]] = {}
    for q in ids:
        group = by_query[q]
        first_q_tokens = next((h["query_tokens"] for h in group if h.get("query_tokens")), None)
        qtokens = [t["token"] for t in first_q_tokens] if first_q_tokens else None
        if query_texts is not None and q < len(query_texts):
            text = query_texts[q]
        else:
            text = "".join(qtokens) if qtokens else ""
        sides: dict[str, list[dict[str, Any]]] = {"proponents": [], "opponents": []}
        for h in sorted(group, key=lambda h: -abs(float(h["score"]))):
            side = "proponents" if float(h["score"]) > 0 else "opponents" if float(h["score"]) < 0 else None
            if side is None:
                continue
            row = int(h["row_id"])
            hit: dict[str, Any] = {"row": row, "rank": len(sides[side]) + 1, "score": r4(h["score"])}
            if h.get("tokens"):
                hit["token_scores"] = r4s(t["score"] for t in h["tokens"])
            if h.get("query_tokens"):
                hit["query_token_scores"] = r4s(t["score"] for t in h["query_tokens"])
            sides[side].append(hit)
            if str(row) not in docs:
                docs[str(row)] = hit_doc(h, texts)
        page["queries"].append(
            {
                "id": q,
                "label": f"query {q}",
                "text": text,
                "tokens": qtokens,
                **sides,
                "histogram": histogram(np.array([float(h["score"]) for h in group]), bins),
                "histogram_of": f"the {len(group)} hits of the results file",
            }
        )
    page["docs"] = docs
    return page


def hit_doc(hit: dict[str, Any], texts: TrainingTexts | None) -> dict[str, Any]:
    tokens = [t["token"] for t in hit["tokens"]] if hit.get("tokens") else None
    if tokens is not None and not any(tokens):
        tokens = None  # the query engine had no training texts to decode
    text = texts.text(int(hit["row_id"])) if texts is not None else ""
    if not text:
        text = "".join(tokens) if tokens else str(hit.get("text") or "")
    return {"text": text, "tokens": tokens}


def is_store(path: str) -> bool:
    return (Path(path) / MANIFEST).is_file()
