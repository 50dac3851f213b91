"""``bergson serve --index STORE``: a local page that explains typed queries from a store.

The store is opened read-only (memory-mapped) and exact search is used, so nothing is ever
written beside it. Requests are answered by a thread each, but the model work of one query
at a time: the others wait in line (up to ``--max_waiting``; beyond that they are answered 503
with ``Retry-After``).

The server runs beside the user's browser, so a hostile web page is part of its threat model:
a Host header that does not name this server is refused (DNS rebinding), a query must carry a
JSON content type and, when the browser names its page (Origin, Referer, Sec-Fetch-Site), come
from this server's own page (CSRF), and a malformed request line, length or body gets a 4xx
at once.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import re
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from ..config import ModelOptions, QueryConfig, ServeConfig
from ..errors import BergsonError
from ..store.manifest import read_manifest
from .data import empty_page, from_hits, histogram, manifest_entry
from .render import render

logger = logging.getLogger(__name__)

MAX_BODY = 1 << 20
LOOPBACK = ("127.0.0.1", "localhost", "::1")
RETRY_AFTER_S = 2
"""Seconds a busy server asks a client to wait (``Retry-After``) before it tries again."""


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
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BergsonError(
                f"The query holds an unpaired surrogate ({text[e.start]!r} at character {e.start}): "
                "send valid Unicode text."
            ) from None
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


class Refused(Exception):
    """A request answered with an error status before any model work."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


REQUEST_LINE = re.compile(rb"[A-Z]+ \S+ HTTP/1\.[01]\r?\n")
WILDCARDS = ("", "0.0.0.0", "::")


def split_host(value: str) -> tuple[str, int | None]:
    """``("localhost", 8000)`` from a Host header ``localhost:8000`` (``[::1]:8000`` for IPv6);
    ValueError when it is not a host with an optional numeric port."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
        if not bracket or (rest and port is None):
            raise ValueError(value)
    elif value.count(":") == 1:
        name, port = value.split(":")
    else:
        name, port = value, None
    if not name or any(c in name for c in "/@ \\?#"):
        raise ValueError(value)
    if port is not None and not (port.isdigit() and len(port) <= 5):
        raise ValueError(value)
    return name.rstrip("."), None if port is None else int(port)


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class Handler(BaseHTTPRequestHandler):
    """The page (GET /) and the query endpoint (POST /api/query), with the checks a server beside
    a browser needs: the Host header must name this server (a foreign name is a DNS-rebinding
    page), a query must come from the page's own origin with a JSON body (a cross-site form or
    ``text/plain`` fetch is refused), and a malformed request gets a 4xx at once."""

    server: LiveServer
    default_request_version = "HTTP/1.0"  # error replies to a garbage request line carry a status line
    timeout = 30  # seconds a client may leave a request half-sent

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    def parse_request(self) -> bool:
        line: bytes = getattr(self, "raw_requestline", b"")
        if not REQUEST_LINE.fullmatch(line):
            self.command = ""  # no method was read
            self.requestline = str(line, "iso-8859-1").rstrip("\r\n")
            self.request_version = self.default_request_version
            self.close_connection = True
            self._json(
                HTTPStatus.BAD_REQUEST, {"error": "Malformed request line; expected 'METHOD /path HTTP/1.1'."}
            )
            return False
        return super().parse_request()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        self.close_connection = True
        self._json(code, {"error": message or HTTPStatus(code).phrase})

    def _send(self, status: int, body: bytes, kind: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, value: dict[str, Any], extra: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(value).encode(), "application/json", extra)

    # ------------------------------------------------------------------ checks
    def _check_host(self) -> None:
        value = self.headers.get("Host")
        if value is None:
            raise Refused(HTTPStatus.BAD_REQUEST, "The request has no Host header.")
        try:
            name, port = split_host(value)
        except ValueError:
            raise Refused(HTTPStatus.BAD_REQUEST, f"Malformed Host header {value!r}.") from None
        if not self.server.allows_host(name, port):
            raise Refused(
                HTTPStatus.FORBIDDEN,
                f"Host {value!r} is not this server (open {self.server.url}); a foreign name that "
                "resolves here is how a web page reaches a local server (DNS rebinding).",
            )

    def _check_same_origin(self) -> None:
        """A browser names the page that sent a POST in Origin (or Referer): it must be ours."""
        site = self.headers.get("Sec-Fetch-Site")
        if site is not None and site.lower() not in ("same-origin", "none"):
            raise Refused(HTTPStatus.FORBIDDEN, f"Cross-site request refused (Sec-Fetch-Site: {site}).")
        ours = "http://" + self.headers.get("Host", "").strip().lower()
        origin = self.headers.get("Origin")
        if origin is not None:
            if origin.strip().lower().rstrip("/") != ours:
                raise Refused(HTTPStatus.FORBIDDEN, f"Cross-origin request from {origin!r} refused.")
            return
        referer = self.headers.get("Referer")
        if referer is not None:
            parts = urlsplit(referer.strip())
            if f"{parts.scheme}://{parts.netloc}".lower() != ours:
                raise Refused(HTTPStatus.FORBIDDEN, f"Cross-origin request from {referer!r} refused.")

    def _check_json(self) -> None:
        kind = self.headers.get("Content-Type", "")
        if kind.split(";", 1)[0].strip().lower() != "application/json":
            raise Refused(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                f"Send the query as Content-Type: application/json (got {kind or 'none'!r}).",
            )

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise Refused(HTTPStatus.LENGTH_REQUIRED, "Send the query with a Content-Length, not chunked.")
        value = self.headers.get("Content-Length")
        if value is None:
            self.close_connection = True
            raise Refused(HTTPStatus.LENGTH_REQUIRED, "The query has no Content-Length.")
        if not (value.strip().isdigit() and value.strip().isascii()):
            self.close_connection = True
            raise Refused(HTTPStatus.BAD_REQUEST, f"Content-Length {value!r} is not a byte count.")
        length = int(value)
        if length > MAX_BODY:
            self.close_connection = True
            raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "The query is far too long.")
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            raise Refused(HTTPStatus.REQUEST_TIMEOUT, "The query's body did not arrive in time.") from None
        if len(body) < length:
            self.close_connection = True
            raise Refused(HTTPStatus.BAD_REQUEST, f"The body ended after {len(body)} of {length} bytes.")
        return body

    # ---------------------------------------------------------------- methods
    def do_GET(self) -> None:
        try:
            self._check_host()
        except Refused as e:
            self._json(e.status, {"error": str(e)})
            return
        if self.path.split("?", 1)[0] in ("/", "/index.html"):
            self._send(HTTPStatus.OK, self.server.html.encode(), "text/html; charset=utf-8")
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {self.path}; open /"})

    def do_POST(self) -> None:
        try:
            body = self._read_body()  # first: an unread body would reset the connection on close
            self._check_host()
            if self.path != "/api/query":
                raise Refused(HTTPStatus.NOT_FOUND, f"no endpoint {self.path}; POST /api/query")
            self._check_same_origin()
            self._check_json()
            text = json.loads(body or b"{}")
            text = text.get("text") if isinstance(text, dict) else None
        except Refused as e:
            self._json(e.status, {"error": str(e)})
            return
        except (json.JSONDecodeError, UnicodeDecodeError):
            self._json(HTTPStatus.BAD_REQUEST, {"error": 'Send JSON: {"text": "..."}.'})
            return
        try:
            self._json(HTTPStatus.OK, self.server.live.answer(text))
        except Busy as e:
            self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(e)}, {"Retry-After": str(RETRY_AFTER_S)})
        except BergsonError as e:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
        except Exception as e:  # a failure of one query must not take the server down
            logger.exception("query failed")
            self._json(
                HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"The query failed: {type(e).__name__}: {e}"}
            )


class LiveServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # a burst of connections waits to be accepted instead of being reset

    def __init__(self, live: LiveQueries, host: str, port: int):
        self.live = live
        self.html = render(live.page())
        super().__init__((host, port), Handler)
        bound = str(self.server_address[0]).lower()
        self.host_names = {"localhost", "127.0.0.1", "::1", bound, str(host).lower().strip("[]")}
        self.any_address = str(host) in WILDCARDS
        if self.any_address:  # reachable by any of this machine's addresses, and by its name
            self.host_names.add(socket.gethostname().lower())

    def allows_host(self, name: str, port: int | None) -> bool:
        """Whether a Host header names this server: its bound address, a loopback name, or (bound
        to every address) any IP literal or this machine's name; a port, if given, must be ours."""
        if port is not None and port != self.server_address[1]:
            return False
        return name in self.host_names or (self.any_address and is_ip(name))

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
