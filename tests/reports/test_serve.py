"""`bergson serve` without a browser: answers against brute force, queued concurrent requests,
messages for bad queries, and a store left untouched."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bergson import IndexConfig, ServeConfig, build
from bergson.config import DataConfig
from bergson.reports.serve import make_server

TEXT = "The river flows through the old town"


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def server(report_stores):
    store = report_stores["store"]
    before = snapshot(store.root)
    common = report_stores["common"]
    cfg = ServeConfig(
        index=str(store.root), model=common["model"], precision="fp32", device="cpu", top_k=3, per_token=True,
        port=0, max_query_chars=200,
    )  # fmt: skip
    srv = make_server(cfg)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, before
    srv.shutdown()
    srv.server_close()


def post(url: str, body: object) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "api/query", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def run_concurrently(worker, n: int) -> None:
    """``worker(i)`` for i < n, each in its own thread, all started before any is awaited."""
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)


def test_answer_matches_brute_force(server, report_stores, tmp_path):
    srv, _ = server
    assert srv.server_address[0] == "127.0.0.1"
    status, answer = post(srv.url, {"text": TEXT})
    assert status == 200
    # the query's gradient as a one-document store, scored against every row by hand
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"text": TEXT}) + "\n")
    common = report_stores["common"]
    qstore = build(
        IndexConfig(
            run_path=str(tmp_path / "q"), data=DataConfig(dataset=str(qfile), truncation=True), **common
        )
    )
    store = report_stores["store"]
    brute = np.asarray(store.all, np.float64) @ np.asarray(qstore.all, np.float64)[0]
    q = answer["query"]
    order = np.argsort(-brute, kind="stable")
    assert [h["row"] for h in q["proponents"]] == [int(i) for i in order[:3] if brute[i] > 0]
    assert [h["row"] for h in q["opponents"]] == [int(i) for i in order[::-1][:3] if brute[i] < 0]
    for h in q["proponents"] + q["opponents"]:
        np.testing.assert_allclose(h["score"], brute[h["row"]], rtol=2e-3)
        np.testing.assert_allclose(sum(h["token_scores"]), h["score"], rtol=1e-2)
        np.testing.assert_allclose(sum(h["query_token_scores"]), h["score"], rtol=1e-2)
        doc = answer["docs"][str(h["row"])]
        assert len(doc["tokens"]) == len(h["token_scores"]) == store.rows["num_tokens"][h["row"]]
    assert "".join(q["tokens"]) == TEXT and q["text"] == TEXT
    assert sum(q["histogram"]["counts"]) == len(store)
    np.testing.assert_allclose(
        [q["histogram"]["lo"], q["histogram"]["hi"]], [brute.min(), brute.max()], rtol=2e-3
    )


def test_concurrent_requests_are_queued(server):
    srv, before = server
    live = srv.live
    active, peak = [0], [0]
    lock = threading.Lock()
    compute = live._compute

    def counted(text):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.05)
            return compute(text)
        finally:
            with lock:
                active[0] -= 1

    live._compute = counted
    texts = [TEXT] * 4 + ["A history of music and its instruments"] * 2
    results: list = [None] * len(texts)

    def worker(i):
        results[i] = post(srv.url, {"text": texts[i]})

    try:
        run_concurrently(worker, len(texts))
    finally:
        live._compute = compute
    assert all(r is not None and r[0] == 200 for r in results), results
    assert peak[0] == 1  # model work never overlapped
    rows = [[h["row"] for h in r[1]["query"]["proponents"]] for r in results]
    assert rows[0] == rows[1] == rows[2] == rows[3] and rows[4] == rows[5]
    assert snapshot(Path(live.cfg.index)) == before


def test_busy_empty_and_too_long(server):
    srv, _ = server
    live = srv.live
    for text, status, message in [
        ("   ", 400, "empty"),
        ("x" * 201, 400, "too long: 201 characters, the limit is 200"),
        ("x", 400, "single token"),
        (None, 400, "empty"),
    ]:
        code, answer = post(srv.url, {"text": text})
        assert code == status and message in answer["error"], answer
    assert post(srv.url, b"{not json")[0] == 400
    budget = live.engine.max_tokens
    live.engine.max_tokens = 4
    try:
        code, answer = post(srv.url, {"text": TEXT})
    finally:
        live.engine.max_tokens = budget
    assert code == 400 and re.search(r"too long: \d+ tokens, the store's token budget is 4", answer["error"])
    # with the model busy and one request waiting, a second is told to retry
    cfg = live.cfg
    live.cfg = replace(cfg, max_waiting=1)
    waiting: list = []
    try:
        with live._work:
            t = threading.Thread(target=lambda: waiting.append(post(srv.url, {"text": TEXT})))
            t.start()
            deadline = time.time() + 60
            while live._waiting < 1 and time.time() < deadline:
                time.sleep(0.01)
            code, answer = post(srv.url, {"text": TEXT})
            assert code == 503 and "busy" in answer["error"]
        t.join(120)
    finally:
        live.cfg = cfg
    assert waiting and waiting[0][0] == 200


def test_page_and_routes(server):
    srv, before = server
    with urllib.request.urlopen(srv.url, timeout=30) as r:
        html = r.read().decode()
    start = html.index('id="bergson-data">') + len('id="bergson-data">')
    page = json.loads(html[start : html.index("</script>", start)])
    assert page["live"] is True and page["queries"] == []
    assert page["manifest"]["summary"]["store"] == srv.live.cfg.index
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(srv.url + "nope", timeout=30)
    assert e.value.code == 404
    assert snapshot(Path(srv.live.cfg.index)) == before


def test_serve_errors(tmp_path, capsys):
    from bergson.cli import main

    for args, message in [
        (["--index", str(tmp_path / "missing")], "not a bergson store"),
        (["--index", str(tmp_path), "--port", "70000"], "--port 70000"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(["serve", *args])
        err = capsys.readouterr().err
        assert e.value.code == 1 and message in err and "Traceback" not in err


# --------------------------------------------------------------- a hostile page or client
def raw(srv, data: bytes, shut: bool = False, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send bytes on a fresh connection; (status, headers, body) of the reply. The write side stays
    open unless ``shut``, so a server that waits for more input times out here instead of answering."""
    with socket.create_connection(srv.server_address[:2], timeout=timeout) as s:
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            assert chunk, f"the server closed without an answer (got {buf!r})"
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
    status = lines[0].split(" ")
    assert status[0] in ("HTTP/1.0", "HTTP/1.1"), lines[0]
    return int(status[1]), headers, body


def request(srv, method="POST", path="/api/query", body=b"", host=None, **headers: str) -> bytes:
    host = host if host is not None else f"127.0.0.1:{srv.server_address[1]}"
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"] if host else [f"{method} {path} HTTP/1.1"]
    if method == "POST" and "Content_Length" not in headers:
        headers["Content_Length"] = str(len(body))
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


QUERY = json.dumps({"text": TEXT}).encode()


def test_foreign_host_is_refused(server):
    """DNS rebinding: a page at attacker.example whose name now resolves to 127.0.0.1 sends
    Host: attacker.example; it gets neither the page (which holds the store's documents) nor answers."""
    srv, _ = server
    port = srv.server_address[1]
    before = srv.live.answered
    for host in (
        "attacker.example",
        f"attacker.example:{port}",
        "localhost.attacker.example",
        f"127.0.0.1:{port + 1}",
    ):
        status, _, body = raw(srv, request(srv, "GET", "/", host=host))
        assert status == 403 and "not this server" in json.loads(body)["error"], (host, body)
        status, _, body = raw(srv, request(srv, body=QUERY, host=host, Content_Type="application/json"))
        assert status == 403, (host, body)
    for host in ("", "a b", "[::1", f"127.0.0.1:{port}x"):
        assert raw(srv, request(srv, "GET", "/", host=host))[0] == 400, host
    assert srv.live.answered == before  # no query ran
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", "localhost", f"[::1]:{port}"):
        status, headers, body = raw(srv, request(srv, "GET", "/", host=host))
        assert (
            status == 200 and b'id="bergson-data"' in body and headers["x-content-type-options"] == "nosniff"
        )


def test_cross_origin_queries_are_refused(server):
    """CSRF: a foreign page's form or text/plain fetch must not run a query; the page's own
    fetch (same Origin, JSON) and non-browser clients (no Origin) still do."""
    srv, _ = server
    ours = f"http://127.0.0.1:{srv.server_address[1]}"
    before = srv.live.answered
    for status, headers in [
        (403, dict(Origin="http://attacker.example", Content_Type="text/plain")),
        (403, dict(Origin="http://attacker.example", Content_Type="application/json")),
        (403, dict(Origin="null", Content_Type="application/json")),
        (403, dict(Referer="http://attacker.example/page.html", Content_Type="application/json")),
        (403, dict(Origin=ours.replace("http:", "https:"), Content_Type="application/json")),
        (403, dict(Sec_Fetch_Site="cross-site", Content_Type="application/json")),
        (415, dict(Origin=ours, Content_Type="text/plain")),
        (415, dict(Content_Type="application/x-www-form-urlencoded")),
        (415, dict(Content_Type="multipart/form-data; boundary=x")),
        (415, {}),
    ]:
        code, _, body = raw(srv, request(srv, body=QUERY, **headers))
        assert code == status, (headers, code, body)
        assert srv.live.answered == before, headers
    for headers in [
        dict(Origin=ours, Content_Type="application/json", Sec_Fetch_Site="same-origin"),
        dict(Referer=ours + "/", Content_Type="application/json; charset=utf-8"),
        dict(Content_Type="application/json"),
    ]:
        code, _, body = raw(srv, request(srv, body=QUERY, **headers))
        assert code == 200 and json.loads(body)["query"]["text"] == TEXT, (headers, body)
    assert srv.live.answered == before + 3


def test_malformed_requests_get_a_4xx_at_once(server):
    srv, _ = server
    json_type = dict(Content_Type="application/json")
    cases = [
        (400, request(srv, Content_Length="-5", **json_type), "not a byte count"),
        (400, request(srv, Content_Length="abc", **json_type), "not a byte count"),
        (400, request(srv, Content_Length="+7", **json_type), "not a byte count"),
        (413, request(srv, Content_Length=str(1 << 30), **json_type), "far too long"),
        (411, request(srv, Transfer_Encoding="chunked", **json_type) + b"5\r\nhello\r\n0\r\n\r\n", "chunked"),
        (400, request(srv, body=b'{"text": "\\ud800 lone"}', **json_type), "unpaired surrogate"),
        (400, request(srv, body=b'{"text": "\xff\xfe"}', **json_type), "Send JSON"),
        (400, b"\x00\x01\x02garbage\r\n\r\n", "Malformed request line"),
        (400, b"hello world\r\n\r\n", "Malformed request line"),
        (400, b"GET /\r\n\r\n", "Malformed request line"),  # HTTP/0.9 would answer without a status line
        (400, b"GET / HTTP/2.0\r\n\r\n", "Malformed request line"),
        (400, b"\r\n\r\n", "Malformed request line"),
    ]
    for status, data, message in cases:
        start = time.perf_counter()
        code, _, body = raw(srv, data, timeout=5)
        assert code == status and message in json.loads(body)["error"], (data[:60], code, body)
        assert time.perf_counter() - start < 2, data[:60]
    # a body that ends early (the client closed its side) and a POST without a length
    short = request(srv, Content_Length="100", **json_type) + b'{"text":'
    assert raw(srv, short, shut=True)[0] == 400
    no_length = f"POST /api/query HTTP/1.1\r\nHost: 127.0.0.1:{srv.server_address[1]}\r\n\r\n".encode()
    assert raw(srv, no_length, shut=True)[0] == 411
    assert raw(srv, request(srv, "GET", "/"))[0] == 200  # and the server is still up


@pytest.mark.parametrize("max_waiting", [50, 16])
def test_fifty_concurrent_queries_are_queued_or_told_to_retry(server, max_waiting):
    """50 queries at once (the model slowed so that they overlap): each is answered, 200 or 503
    with Retry-After beyond --max_waiting; none is reset or left without an answer."""
    srv, _ = server
    live = srv.live
    compute = live._compute

    def slow(text):
        time.sleep(0.02)
        return compute(text)

    cfg = live.cfg
    live.cfg = replace(cfg, max_waiting=max_waiting)
    live._compute = slow
    data = request(srv, body=QUERY, Content_Type="application/json")
    results: list = [None] * 50
    gate = threading.Barrier(50)

    def worker(i):
        gate.wait()
        try:
            results[i] = raw(srv, data, timeout=120)
        except OSError as e:  # a reset or a timeout
            results[i] = e

    try:
        run_concurrently(worker, 50)
    finally:
        live._compute = compute
        live.cfg = cfg
    assert all(isinstance(r, tuple) for r in results), [r for r in results if not isinstance(r, tuple)]
    codes = [r[0] for r in results]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= min(max_waiting, 50)
    if max_waiting >= 50:
        assert codes.count(200) == 50
    for code, headers, body in results:
        if code == 503:
            assert headers["retry-after"].isdigit() and "busy" in json.loads(body)["error"]
        else:
            assert json.loads(body)["query"]["text"] == TEXT


def test_host_names_a_wildcard_server_accepts():
    """Bound to every address, the server is reached by any of its IP addresses or its name; a
    domain name that is not the machine's is still refused (DNS rebinding needs a name)."""
    from types import SimpleNamespace

    from bergson.reports.serve import LiveServer, split_host

    assert split_host("LocalHost.:80") == ("localhost", 80)
    assert split_host("[::1]:8000") == ("::1", 8000)
    for bad in ("[::1", "[::1]x", "a:b", "host:123456", "user@host", "a/b"):
        with pytest.raises(ValueError):
            split_host(bad)
    wildcard = SimpleNamespace(
        host_names={"localhost", "127.0.0.1", "::1", "0.0.0.0", "mybox"},
        any_address=True,
        server_address=("0.0.0.0", 8000),
    )
    loopback = SimpleNamespace(
        host_names={"localhost", "127.0.0.1", "::1"}, any_address=False, server_address=("127.0.0.1", 8000)
    )
    for name, port, on_wildcard, on_loopback in [
        ("10.1.2.3", 8000, True, False),
        ("::ffff:10.1.2.3", None, True, False),
        ("mybox", 8000, True, False),
        ("localhost", 8000, True, True),
        ("attacker.example", 8000, False, False),
        ("10.1.2.3", 9000, False, False),
    ]:
        assert LiveServer.allows_host(wildcard, name, port) is on_wildcard, name  # type: ignore[arg-type]
        assert LiveServer.allows_host(loopback, name, port) is on_loopback, name  # type: ignore[arg-type]
