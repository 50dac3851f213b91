"""`bergson serve` without a browser: answers against brute force, queued concurrent requests,
messages for bad queries, and a store left untouched."""

from __future__ import annotations

import hashlib
import json
import re
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

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(texts))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
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
