"""`bergson report`: the page's data against the stores it came from, escaping, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bergson import BergsonError, ReportConfig, report
from bergson.querying import write_hits
from bergson.reports.build import build_page
from bergson.reports.render import DATA_MARK, render, template
from tests.helpers.assets import HOSTILE
from tests.helpers.cli import run


def embedded(html: str) -> dict:
    start = html.index('id="bergson-data">') + len('id="bergson-data">')
    return json.loads(html[start : html.index("</script>", start)])


def test_scores_store_report_matches_the_store(report_stores, tmp_path):
    scores, store, texts = report_stores["scores"], report_stores["store"], report_stores["texts"]
    out = report(ReportConfig(source=str(scores.root), output=str(tmp_path / "r.html"), top_k=4))
    html = out.read_text()
    page = embedded(html)
    s = np.asarray(scores["scores"], np.float64)
    assert s.shape == (24, 3) and len(page["queries"]) == 3
    for c, q in enumerate(page["queries"]):
        assert q["text"] == texts[c]  # the query store's rows, in order
        order = np.argsort(-s[:, c], kind="stable")
        best = [i for i in order[:4] if s[i, c] > 0]
        worst = [i for i in order[::-1][:4] if s[i, c] < 0]
        assert [h["row"] for h in q["proponents"]] == best and [h["row"] for h in q["opponents"]] == worst
        assert [h["rank"] for h in q["proponents"]] == list(range(1, len(best) + 1))
        for h in q["proponents"] + q["opponents"]:
            np.testing.assert_allclose(h["score"], s[h["row"], c], rtol=1e-3)
            tokens = np.asarray(scores.token_rows(h["row"]))[:, c]
            np.testing.assert_allclose(h["token_scores"], tokens, rtol=1e-3, atol=1e-9)
            np.testing.assert_allclose(sum(h["token_scores"]), h["score"], rtol=1e-2, atol=1e-6)
            doc = page["docs"][str(h["row"])]
            assert len(doc["tokens"]) == store.rows["num_tokens"][h["row"]]
            assert texts[h["row"]].startswith("".join(doc["tokens"])) and doc["text"] == texts[h["row"]]
        hist = q["histogram"]
        assert sum(hist["counts"]) == 24 and len(hist["counts"]) == 30
        np.testing.assert_allclose([hist["lo"], hist["hi"]], [s[:, c].min(), s[:, c].max()], rtol=1e-3)
    summary = page["manifest"]["summary"]
    assert summary["model"] == report_stores["common"]["model"] and summary["store"] == str(scores.root)
    assert summary["kind"] == "scores" and summary["per_token"] is True
    # document text is data, never markup: the hostile row's tags never appear as such
    assert HOSTILE not in html and "<img" not in html
    assert html.count("</script>") == template().count("</script>")


def test_escaping_and_options(report_stores, tmp_path):
    scores = report_stores["scores"]
    page = build_page(ReportConfig(source=str(scores.root), top_k=2, max_queries=2, bins=5))
    assert len(page["queries"]) == 2 and all(len(q["histogram"]["counts"]) == 5 for q in page["queries"])
    assert all(len(q["proponents"]) <= 2 for q in page["queries"])
    page["title"] = "<b>t</b> " + DATA_MARK
    page["queries"][0]["text"] = HOSTILE + "\u2028"
    html = render(page)
    assert embedded(html)["queries"][0]["text"] == HOSTILE + "\u2028"
    assert "<title>&lt;b&gt;t&lt;/b&gt; " + DATA_MARK + "</title>" in html


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_query_results_report(report_stores, query_hits, tmp_path, suffix):
    store, texts = report_stores["store"], report_stores["texts"]
    text, hits = query_hits
    path = tmp_path / f"hits{suffix}"
    write_hits(str(path), hits)
    page = build_page(ReportConfig(source=str(path), index=str(store.root)))
    (q,) = page["queries"]
    assert q["text"] == text and "".join(q["tokens"]) == text
    pos = sorted((h for h in hits if h["score"] > 0), key=lambda h: -h["score"])
    neg = sorted((h for h in hits if h["score"] < 0), key=lambda h: h["score"])
    assert [h["row"] for h in q["proponents"]] == [h["row_id"] for h in pos]
    assert [h["row"] for h in q["opponents"]] == [h["row_id"] for h in neg]
    for h, ref in zip(q["proponents"] + q["opponents"], pos + neg):
        np.testing.assert_allclose(h["token_scores"], [t["score"] for t in ref["tokens"]], rtol=1e-3)
        np.testing.assert_allclose(
            h["query_token_scores"], [t["score"] for t in ref["query_tokens"]], rtol=1e-3
        )
        assert page["docs"][str(h["row"])]["text"] == texts[h["row"]]  # whole text, from --index
    assert page["manifest"]["summary"]["store"] == str(store.root)
    assert sum(q["histogram"]["counts"]) == len(hits)


def test_query_results_with_query_texts(tmp_path):
    """Without token splits or --index, the page shows the snippets and --queries' texts."""
    hits = [
        {"query": 1, "rank": 1, "row_id": 7, "score": 0.5, "text": "seven"},
        {"query": 1, "rank": 2, "row_id": 3, "score": -0.25, "text": "three"},
        {"query": 0, "rank": 1, "row_id": 3, "score": 2.0, "text": "three"},
    ]
    path = tmp_path / "hits.jsonl"
    write_hits(str(path), hits)
    qfile = tmp_path / "q.jsonl"
    qfile.write_text('{"prompt": "first"}\n{"prompt": "second"}\n')
    page = build_page(ReportConfig(source=str(path), queries=str(qfile), query_column="prompt"))
    assert [q["text"] for q in page["queries"]] == ["first", "second"]
    assert [h["row"] for h in page["queries"][1]["proponents"]] == [7]
    assert [h["row"] for h in page["queries"][1]["opponents"]] == [3]
    assert page["docs"]["7"] == {"text": "seven", "tokens": None} and page["manifest"] is None
    with pytest.raises(BergsonError, match="--query_column"):
        build_page(ReportConfig(source=str(path), queries=str(qfile)))


def test_report_errors(report_stores, tmp_path):
    store = report_stores["store"]
    with pytest.raises(BergsonError, match="SOURCE is required"):
        build_page(ReportConfig())
    with pytest.raises(BergsonError, match="gradients store"):
        build_page(ReportConfig(source=str(store.root)))
    with pytest.raises(BergsonError, match="--output"):
        build_page(ReportConfig(source=str(store.root), output="r.txt"))
    bad = tmp_path / "hits.jsonl"
    bad.write_text('{"rank": 1}\n')
    with pytest.raises(BergsonError, match="lack the fields"):
        build_page(ReportConfig(source=str(bad)))
    proc = run("report", str(tmp_path / "missing"), check=False)
    assert proc.returncode == 1 and "no such file" in proc.stderr and "Traceback" not in proc.stderr


def test_report_from_the_command_line(report_stores, tmp_path, capsys):
    from bergson.cli import main

    out = tmp_path / "cli.html"
    main(["report", str(report_stores["scores"].root), "--output", str(out), "--top_k", "2"])
    assert "wrote a report of 3 queries" in capsys.readouterr().out
    assert [len(q["proponents"]) <= 2 for q in embedded(out.read_text())["queries"]] == [True] * 3


def test_score_matrix_store_with_a_query_dataset(report_stores, tmp_path):
    """A store written like EK-FAC's or MAGIC's (a score matrix, queries named by dataset, no token
    rows): the lists follow the matrix, the texts come from the query dataset."""
    from bergson.store.scores import save_score_matrix

    store = report_stores["store"]
    rng = np.random.default_rng(0)
    s = rng.normal(size=(len(store), 2)).astype(np.float32)
    s[:, 1] = np.abs(s[:, 1])  # a column without opponents
    qfile = tmp_path / "q.jsonl"
    qfile.write_text('{"text": "alpha"}\n{"text": "beta"}\n')
    info = {"kind": "ekfac", "mode": "individual", "query_dataset": str(qfile)}
    scores = save_score_matrix(tmp_path / "s", s, store.manifest, info, overwrite=False)
    page = build_page(ReportConfig(source=str(scores.root), top_k=3))
    assert [q["text"] for q in page["queries"]] == ["alpha", "beta"]
    for c, q in enumerate(page["queries"]):
        order = np.argsort(-s[:, c], kind="stable")
        assert [h["row"] for h in q["proponents"]] == [int(i) for i in order[:3] if s[i, c] > 0]
        assert [h["row"] for h in q["opponents"]] == [int(i) for i in order[::-1][:3] if s[i, c] < 0]
        assert all("token_scores" not in h for h in q["proponents"])
    assert page["queries"][1]["opponents"] == []
    assert all(d["tokens"] is None and d["text"] for d in page["docs"].values())
    assert page["manifest"]["summary"]["method"] == "ekfac (individual)"
