"""The report and the served page in headless Chromium (Playwright driving Debian's chromium):
the top-k lists, the token shading, the search box; screenshots are saved as artifacts."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from bergson import ServeConfig
from bergson.reports.build import build_page
from bergson.reports.render import render
from bergson.reports.serve import make_server
from tests.helpers.assets import HOSTILE

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    for name in (os.environ.get("BERGSON_CHROMIUM"), "/usr/bin/chromium", "chromium", "chromium-browser"):
        if name and (path := shutil.which(name)):
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser tests need playwright: pip install playwright (the dev extra has it)")
    path = chromium_path()
    if path is None:
        pytest.skip("browser tests need Chromium: apt-get install chromium (or set BERGSON_CHROMIUM)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=ARGS)
        yield b
        b.close()


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']")
    return page, errors


def test_report_in_a_browser(browser, report_stores, tmp_path, artifacts):
    from bergson import ReportConfig

    scores = report_stores["scores"]
    data = build_page(ReportConfig(source=str(scores.root), top_k=4, collapse_chars=100))
    data["queries"][0]["text"] = HOSTILE + " " + data["queries"][0]["text"]
    out = tmp_path / "report.html"
    out.write_text(render(data))
    page, errors = open_page(browser, out.as_uri())
    s = np.asarray(scores["scores"], np.float64)

    # the top-k lists of query 0 are the store's best and worst rows
    order = np.argsort(-s[:, 0], kind="stable")
    rows = page.eval_on_selector_all("#proponents li.hit", "els => els.map(e => Number(e.dataset.row))")
    assert rows == [int(i) for i in order[:4] if s[i, 0] > 0] and rows
    worst = page.eval_on_selector_all("#opponents li.hit", "els => els.map(e => Number(e.dataset.row))")
    assert worst == [int(i) for i in order[::-1][:4] if s[i, 0] < 0]

    # token shading: one span per token, green where positive, red where negative, darkest at the peak
    first = page.locator("#proponents li.hit").first
    spans = first.locator(".doc .tok")
    assert spans.count() == scores.rows["num_tokens"][rows[0]]
    shading = spans.evaluate_all(
        "els => els.map(e => [Number(e.dataset.score), getComputedStyle(e).backgroundColor, e.title])"
    )
    expected = np.asarray(scores.token_rows(rows[0]))[:, 0]
    np.testing.assert_allclose([v for v, _, _ in shading], expected, rtol=1e-3, atol=1e-9)
    alphas = []
    for value, color, title in shading:
        if value > 0:
            assert color.startswith("rgba(22, 163, 74"), color
        elif value < 0:
            assert color.startswith("rgba(220, 38, 38"), color
        assert "% of the score" in title
        alphas.append(float(color.rstrip(")").split(",")[-1]) if color.startswith("rgba") else 0.0)
    assert int(np.argmax(alphas)) == int(np.argmax(np.abs(expected)))

    # long documents are collapsed until clicked
    details = first.locator("details.doc")
    assert details.count() == 1 and not details.evaluate("d => d.open")
    seen = "".join(data["docs"][str(rows[0])]["tokens"])
    assert f"({len(seen)} characters; click to expand)" in first.locator("summary").inner_text()
    first.locator("summary").click()
    assert details.evaluate("d => d.open") and spans.first.is_visible()

    # the query's hostile text is shown as text, never run or parsed as markup
    assert "<img src=x" in page.inner_text("#query-text")
    assert page.evaluate("() => window.__pwned") is None and page.locator("img").count() == 0

    # histogram: 30 bars over every training row
    counts = page.eval_on_selector_all("#histogram rect.bar", "els => els.map(e => Number(e.dataset.count))")
    assert len(counts) == 30 and sum(counts) == len(scores)

    # the search box filters the index by text; Enter opens the first match
    word = report_stores["texts"][1].split()[3]
    visible = "els => els.filter(e => !e.hidden).length"
    assert page.eval_on_selector_all("#index li", visible) == 3
    page.fill("#search", word)
    matches = sum(word.lower() in t.lower() for t in [data["queries"][i]["text"] for i in range(3)])
    assert page.eval_on_selector_all("#index li", visible) == matches >= 1
    assert page.inner_text("#index-count") == f"{matches} of 3 queries"
    page.fill("#search", "no query has this text")
    assert page.eval_on_selector_all("#index li", visible) == 0
    page.fill("#search", report_stores["texts"][1][:30])
    page.press("#search", "Enter")
    assert page.inner_text("#view h2") == "query 1" and page.url.endswith("#q=1")
    assert report_stores["common"]["model"] in page.inner_text("#manifest-summary")
    page.screenshot(path=str(artifacts / "report.png"), full_page=True)
    assert not errors, errors


def test_served_page_in_a_browser(browser, report_stores, artifacts):
    common = report_stores["common"]
    cfg = ServeConfig(
        index=str(report_stores["store"].root), model=common["model"], precision="fp32", device="cpu",
        top_k=3, per_token=True, port=0,
    )  # fmt: skip
    srv = make_server(cfg)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        page, errors = open_page(browser, srv.url)
        assert page.locator("#ask").is_visible() and page.locator("#index li").count() == 0
        # an empty query gets a message in the page
        page.fill("#ask-text", "   ")
        page.click("#ask-button")
        page.wait_for_selector("#message.error")
        assert "empty" in page.inner_text("#message")
        text = "The river flows through the old town"
        page.fill("#ask-text", text)
        page.click("#ask-button")
        page.wait_for_selector("#proponents li.hit")
        assert "Answered in" in page.inner_text("#message")
        answer = srv.live.answer(text)["query"]
        rows = page.eval_on_selector_all("#proponents li.hit", "els => els.map(e => Number(e.dataset.row))")
        assert rows == [h["row"] for h in answer["proponents"]] and 1 <= len(rows) <= 3
        first = page.locator("#proponents li.hit").first
        assert first.locator(".doc .tok").count() == len(answer["proponents"][0]["token_scores"])
        assert first.locator(".qtokens .tok").count() == len(answer["tokens"])
        assert page.locator("#index li").count() == 1 and text in page.inner_text("#index")
        page.fill("#search", "zzz")
        assert page.inner_text("#index-count") == "0 of 1 query"
        page.screenshot(path=str(artifacts / "serve.png"), full_page=True)
        assert not errors, errors
    finally:
        srv.shutdown()
        srv.server_close()
    assert Path(artifacts / "serve.png").stat().st_size > 0
    json.dumps(answer)  # what the page got is plain JSON


def test_a_thousand_queries_stay_navigable(browser, tmp_path):
    from bergson.reports.data import empty_page

    data = empty_page("many", 600)
    data["docs"] = {"0": {"text": "a training document", "tokens": None}}
    hit = {"row": 0, "rank": 1, "score": 1.0}
    data["queries"] = [
        {"id": i, "label": f"query {i}", "text": f"question number {i} about topic {i % 7}", "tokens": None,
         "proponents": [hit], "opponents": [], "histogram": None, "histogram_of": ""}
        for i in range(1000)
    ]  # fmt: skip
    out = tmp_path / "many.html"
    out.write_text(render(data))
    page, errors = open_page(browser, out.as_uri())
    assert page.inner_text("#index-count") == "1000 of 1000 queries"
    page.fill("#search", "number 737 ")
    assert page.inner_text("#index-count") == "1 of 1000 queries"
    page.press("#search", "Enter")
    assert page.inner_text("#view h2") == "query 737" and page.locator("#proponents li.hit").count() == 1
    page.fill("#search", "topic 3")
    assert page.inner_text("#index-count") == f"{sum(i % 7 == 3 for i in range(1000))} of 1000 queries"
    assert not errors, errors
