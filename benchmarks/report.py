"""Size and load time of a ``bergson report``, and the latency of ``bergson serve`` per query.

On the example assets: a per-token gradient store of the shipped corpus (tiny-pythia,
documents truncated to --max_length tokens), a query store of --queries texts (the shipped
queries, then the openings of corpus documents), and the scores of the one against the
other with per-token splits. Then:

1. the report of those scores, --top_k proponents and opponents per query: the time to
   gather and render it, its size, and in headless Chromium (Debian's, driven by
   Playwright) the time to DOMContentLoaded, to load, and until the page's script has
   drawn the first query (``drawn_ms``: when the inline script is done, which is
   before DOMContentLoaded ends), median of --loads loads; plus the time to
   open another query from the index;
2. ``bergson serve`` on the same store (--top_k per side, per-token splits): the latency
   of --serve_queries HTTP queries sent one after another (median and p90), measured at
   the client and inside the server.

Prints one JSON object. Load averages at the start and the end show how shared the machine was.

    python -m benchmarks.report [--docs 1500] [--queries 100] [--top_k 20] [--max_length 128]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from bergson import IndexConfig, ReportConfig, ScoreConfig, ServeConfig, build, score
from bergson.config import DataConfig
from bergson.reports.build import build_page
from bergson.reports.render import render
from bergson.reports.serve import make_server

from .common import ASSETS, corpus_slice

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def query_texts(n: int) -> list[str]:
    """The shipped queries, then the first 200 characters of corpus documents from the end."""
    texts = [json.loads(line)["text"] for line in (ASSETS / "queries.jsonl").read_text().splitlines()]
    import gzip

    with gzip.open(ASSETS / "corpus.jsonl.gz", "rt") as f:
        corpus = [json.loads(line)["text"] for line in f]
    texts += [" ".join(t.split())[:200] for t in reversed(corpus)]
    return texts[:n]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def browser_timings(html: Path, loads: int) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("BERGSON_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    out: dict[str, list[float]] = {
        "dom_content_loaded_ms": [],
        "load_ms": [],
        "drawn_ms": [],
        "switch_ms": [],
    }
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=ARGS)
        for _ in range(loads):
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(html.as_uri(), wait_until="load")
            page.wait_for_selector("body[data-ready='1']")
            t = page.evaluate(
                """() => { const n = performance.getEntriesByType('navigation')[0];
                           return [n.domContentLoadedEventEnd, n.loadEventEnd, performance.now()]; }"""
            )
            ready = page.evaluate("() => window.__readyAt || null")
            out["dom_content_loaded_ms"].append(t[0])
            out["load_ms"].append(t[1])
            out["drawn_ms"].append(ready if ready is not None else t[2])
            switch = page.evaluate(
                """() => { const t0 = performance.now();
                           document.querySelectorAll('#index li')[1].click();
                           document.body.offsetHeight; return performance.now() - t0; }"""
            )
            out["switch_ms"].append(switch)
            page.close()
        browser.close()
    return {k: round(statistics.median(v), 1) for k, v in out.items()} | {"loads": loads}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=1500)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--top_k", type=int, default=20)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--projection_dim", type=int, default=4)
    parser.add_argument("--loads", type=int, default=3)
    parser.add_argument("--serve_queries", type=int, default=20)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    result: dict[str, Any] = {"load_average_start": os.getloadavg(), "cpus": os.cpu_count()}
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bergson-report-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model = str(ASSETS / "tiny-pythia")
    common: dict[str, Any] = dict(
        model=model, precision="fp32", device="cpu", projection_dim=args.projection_dim, save_dtype="float32"
    )
    corpus = corpus_slice(work / "corpus.jsonl", args.docs)
    qfile = work / "queries.jsonl"
    qfile.write_text("".join(json.dumps({"text": t}) + "\n" for t in query_texts(args.queries)))
    data: dict[str, Any] = dict(truncation=True, max_length=args.max_length)

    start = time.perf_counter()
    store = build(
        IndexConfig(
            run_path=str(work / "docs"),
            data=DataConfig(dataset=str(corpus), **data),
            per_token=True,
            **common,
        )
    )
    qstore = build(
        IndexConfig(run_path=str(work / "q"), data=DataConfig(dataset=str(qfile), **data), **common)
    )
    scores = score(
        ScoreConfig(
            run_path=str(work / "scores"),
            index=str(store.root),
            query_path=str(qstore.root),
            per_token=True,
            **common,
        )
    )
    result["setup_s"] = round(time.perf_counter() - start, 1)
    result["store"] = {
        "docs": len(store),
        "tokens": int(store.rows["num_tokens"].sum()),
        "queries": len(qstore),
    }

    start = time.perf_counter()
    page = build_page(ReportConfig(source=str(scores.root), top_k=args.top_k))
    gathered = time.perf_counter() - start
    html = render(page)
    out = work / "report.html"
    out.write_text(html, encoding="utf-8")
    hits = sum(len(q["proponents"]) + len(q["opponents"]) for q in page["queries"])
    result["report"] = {
        "queries": len(page["queries"]),
        "top_k": args.top_k,
        "hits": hits,
        "documents": len(page["docs"]),
        "bytes": out.stat().st_size,
        "megabytes": round(out.stat().st_size / 1e6, 2),
        "gather_s": round(gathered, 2),
        "render_s": round(time.perf_counter() - start - gathered, 2),
        "browser": browser_timings(out, args.loads),
    }

    serve_cfg = ServeConfig(
        index=str(store.root),
        model=model,
        precision="fp32",
        device="cpu",
        top_k=args.top_k,
        per_token=True,
        port=0,
    )
    srv = make_server(serve_cfg)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    client, inside = [], []
    try:
        texts = query_texts(args.serve_queries + 1)
        for i, text in enumerate(texts):
            body = json.dumps({"text": text}).encode()
            req = urllib.request.Request(
                srv.url + "api/query", data=body, headers={"Content-Type": "application/json"}
            )
            t0 = time.perf_counter()
            with urllib.request.urlopen(req, timeout=600) as r:
                answer = json.loads(r.read())
            if i:  # the first query warms up the model and loads the dataset's texts
                client.append(1000 * (time.perf_counter() - t0))
                inside.append(1000 * answer["seconds"])
    finally:
        srv.shutdown()
        srv.server_close()
    result["serve"] = {
        "queries": len(client),
        "top_k_per_side": args.top_k,
        "client_ms_median": round(statistics.median(client), 1),
        "client_ms_p90": round(percentile(client, 0.9), 1),
        "server_ms_median": round(statistics.median(inside), 1),
        "server_ms_p90": round(percentile(inside, 0.9), 1),
    }
    result["load_average_end"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
