"""``bergson report SOURCE --output report.html``: one self-contained HTML page."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..config import DataConfig, ReportConfig
from ..errors import BergsonError
from ..store import load_gradients
from ..store.manifest import read_manifest
from .data import (
    HIT_SUFFIXES,
    TrainingTexts,
    from_hits,
    from_scores_store,
    is_store,
    manifest_entry,
    read_hits,
)
from .render import render

logger = logging.getLogger(__name__)


def check(cfg: ReportConfig) -> None:
    if not cfg.source:
        raise BergsonError("SOURCE is required: a scores store or a `bergson query --output` file")
    if not cfg.output.endswith((".html", ".htm")):
        raise BergsonError(f"--output {cfg.output}: use a .html file name")
    if cfg.top_k < 1:
        raise BergsonError(f"--top_k {cfg.top_k}: must be at least 1")
    if cfg.bins < 1:
        raise BergsonError(f"--bins {cfg.bins}: must be at least 1")
    if cfg.max_queries is not None and cfg.max_queries < 1:
        raise BergsonError(f"--max_queries {cfg.max_queries}: must be at least 1")
    src = Path(cfg.source)
    if not src.exists():
        raise BergsonError(f"{cfg.source}: no such file or directory")
    if src.is_dir() and not is_store(cfg.source):
        raise BergsonError(f"{cfg.source}: a directory without a manifest.json; pass a scores store")
    if src.is_file() and not cfg.source.endswith(HIT_SUFFIXES):
        raise BergsonError(f"{cfg.source}: query results are .jsonl, .csv or .parquet files")


def build_page(cfg: ReportConfig) -> dict[str, Any]:
    """The report's data (see :mod:`bergson.reports.data`) without rendering it."""
    check(cfg)
    common: dict[str, Any] = dict(
        bins=cfg.bins, max_queries=cfg.max_queries, title=cfg.title, collapse_chars=cfg.collapse_chars
    )
    if Path(cfg.source).is_dir():
        if cfg.index or cfg.queries:
            raise BergsonError("--index and --queries go with query results, not with a scores store")
        store = load_gradients(cfg.source)
        if store.manifest.kind != "scores":
            raise BergsonError(
                f"{cfg.source} is a {store.manifest.kind} store; a report shows a scores store (from "
                "score, ekfac, trackstar or magic) or query results (bergson query --output)"
            )
        return from_scores_store(store, top_k=cfg.top_k, texts=TrainingTexts(store.manifest), **common)
    hits = read_hits(cfg.source)
    manifest = texts = None
    if cfg.index:
        m = read_manifest(Path(cfg.index))
        manifest, texts = manifest_entry(m, cfg.index), TrainingTexts(m)
    query_texts = None
    if cfg.queries:
        from ..data import load_data

        ds = load_data(DataConfig(dataset=cfg.queries), option="--queries")
        if cfg.query_column not in ds.column_names:
            raise BergsonError(
                f"--query_column {cfg.query_column!r}: not a column of --queries ({', '.join(ds.column_names)})"
            )
        query_texts = [str(t) for t in ds[cfg.query_column]]
    return from_hits(hits, query_texts=query_texts, texts=texts, manifest=manifest, **common)


def report(cfg: ReportConfig) -> Path:
    """Write the report of ``cfg.source`` to ``cfg.output``; returns its path."""
    page = build_page(cfg)
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(page), encoding="utf-8")
    n = len(page["queries"])
    print(
        f"wrote a report of {n} {'query' if n == 1 else 'queries'} to {out} ({out.stat().st_size / 1e6:.2f} MB)"
    )
    return out
