"""``bergson serve --index STORE``: a local page that explains typed queries from a store.

The store is opened read-only (memory-mapped) and exact search is used, so nothing is ever
written beside it. Requests are answered by a thread each, but the model work of one query
at a time: the others wait in line (up to ``--max_waiting``; beyond that they are told the
server is busy).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from ..config import ModelOptions, QueryConfig, ServeConfig
from ..errors import BergsonError
from ..store.manifest import read_manifest
from .data import empty_page, from_hits, histogram, manifest_entry
from .render import render

logger = logging.getLogger(__name__)

MAX_BODY = 1 << 20
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class Busy(BergsonError):
    """More requests wait for the model than --max_waiting allows."""


class LiveQueries:
    """Answers queries one at a time with a :class:`~bergson.querying.QueryEngine`."""

    def __init__(self, cfg: ServeConfig):
        from ..querying import QueryEngine

        if not cfg.index:
            raise BergsonError("--index is required: the gradient store to search")
        if cfg.max_query_chars < 1:
            raise BergsonError(f"--max_query_chars {cfg.max_query_chars}: must be at least 1")
        if cfg.max_waiting < 1:
            raise BergsonError(f"--max_waiting {cfg.max_waiting}: must be at least 1")
        read_manifest(cfg.index)  # a wrong --index fails before the model loads
        self.cfg = cfg
        qcfg = QueryConfig(
            **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelOptions)},
            index=cfg.index,
            top_k=cfg.top_k,
            unit_normalize=cfg.unit_normalize,
            per_token=cfg.per_token,
            preconditioner_path=cfg.preconditioner_path,
            snippet_chars=1 << 30,  # the page shows whole documents (collapsed when long)
            search="exact",  # a FAISS index would be written beside the store
        )
        self.engine = QueryEngine(qcfg)
        self._work = threading.Lock()
        self._count = threading.Lock()
        self._waiting = 0
        self.answered = 0

    def page(self) -> dict[str, Any]:
        page = empty_page(f"bergson serve: {self.cfg.index}", self.cfg.collapse_chars)
        page["manifest"] = manifest_entry(self.engine.attr.manifest, self.cfg.index)
        page["live"] = True
        return page

    def check(self, text: Any) -> str:
        """The query text, or a BergsonError whose message the page shows."""
        if not isinstance(text, str) or not text.strip():
            raise BergsonError("The query is empty: type a text to explain.")
        if len(text) > self.cfg.max_query_chars:
            raise BergsonError(
                f"The query is too long: {len(text)} characters, the limit is {self.cfg.max_query_chars} "
                "(--max_query_chars)."
            )
        return text

    def check_tokens(self, text: str) -> None:
        """Refuse a query longer than the store's token budget (called holding the model lock:
        a fast tokenizer must not be used by two threads at once)."""
        n = len(self.engine.tokenizer(text)["input_ids"])
        if n > self.engine.max_tokens:
            raise BergsonError(
                f"The query is too long: {n} tokens, the store's token budget is {self.engine.max_tokens}."
            )

    def answer(self, text: Any) -> dict[str, Any]:
        """{'query': ..., 'docs': ..., 'seconds': ...} for one query text (waits its turn)."""
        text = self.check(text)
        with self._count:
            if self._waiting >= self.cfg.max_waiting:
                raise Busy(f"The server is busy ({self._waiting} queries waiting); try again shortly.")
            self._waiting += 1
        try:
            with self._work:
                self.check_tokens(text)
                start = time.perf_counter()
                out = self._compute(text)
                out["seconds"] = time.perf_counter() - start
                self.answered += 1
                return out
        finally:
            with self._count:
                self._waiting -= 1

    def _compute(self, text: str) -> dict[str, Any]:
        from datasets import Dataset

        from ..models import numerics

        e = self.engine
        with numerics(e.cfg):
            vecs, modules, qdocs, qtokens = e.vectors(Dataset.from_dict({"text": [text]}), "text", None)
            hits = e.hits(vecs, modules, qdocs, qtokens, reverse=False)
            hits += e.hits(vecs, modules, qdocs, qtokens, reverse=True)
            everything, _ = e.attr.search(vecs, len(e.attr.store), modules=modules)
        unique = {h["row_id"]: h for h in hits}  # a small store may list a row on both sides
        page = from_hits(
            list(unique.values()),
            bins=30,
            max_queries=None,
            query_texts=[text],
            texts=None,
            manifest=None,
            title="",
            collapse_chars=self.cfg.collapse_chars,
        )
        (query,) = page["queries"]
        scores = everything[0].numpy()
        query["histogram"] = histogram(scores[np.isfinite(scores)], 30)
        query["histogram_of"] = f"all {len(e.attr.store)} training documents"
        if query["tokens"] is None:
            query["tokens"] = [e.tokenizer.decode([int(t)]) for t in qdocs.input_ids[0]]
        return {"query": query, "docs": page["docs"]}


class Handler(BaseHTTPRequestHandler):
    server: LiveServer

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, value: dict[str, Any]) -> None:
        self._send(status, json.dumps(value).encode(), "application/json")

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] in ("/", "/index.html"):
            self._send(HTTPStatus.OK, self.server.html.encode(), "text/html; charset=utf-8")
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {self.path}; open /"})

    def do_POST(self) -> None:
        if self.path != "/api/query":
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no endpoint {self.path}; POST /api/query"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "The query is far too long."})
            return
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
            text = body.get("text") if isinstance(body, dict) else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            self._json(HTTPStatus.BAD_REQUEST, {"error": 'Send JSON: {"text": "..."}.'})
            return
        try:
            self._json(HTTPStatus.OK, self.server.live.answer(text))
        except Busy as e:
            self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(e)})
        except BergsonError as e:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
        except Exception as e:  # a failure of one query must not take the server down
            logger.exception("query failed")
            self._json(
                HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"The query failed: {type(e).__name__}: {e}"}
            )


class LiveServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, live: LiveQueries, host: str, port: int):
        self.live = live
        self.html = render(live.page())
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host if ':' not in str(host) else f'[{host}]'}:{port}/"


def make_server(cfg: ServeConfig) -> LiveServer:
    """A server ready to ``serve_forever()`` (loads the model and opens the store)."""
    if not 0 <= cfg.port <= 65535:
        raise BergsonError(f"--port {cfg.port}: must be between 0 and 65535")
    live = LiveQueries(cfg)
    try:
        server = LiveServer(live, cfg.host, cfg.port)
    except OSError as e:
        raise BergsonError(f"--host {cfg.host} --port {cfg.port}: cannot listen there ({e})") from e
    if cfg.host not in LOOPBACK:
        logger.warning("serving on %s: anyone who can reach this address can run queries", cfg.host)
    return server


def serve(cfg: ServeConfig) -> None:
    """Run ``bergson serve`` until interrupted."""
    server = make_server(cfg)
    print(f"serving {cfg.index} at {server.url} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()
