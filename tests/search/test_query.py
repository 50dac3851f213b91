"""The Attributor and `bergson query`."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from bergson import BergsonError, build
from bergson.collect.losses import per_document_loss
from bergson.config import DataConfig, QueryConfig
from bergson.models import load_model
from bergson.querying import query
from bergson.search import FaissConfig, exact_topk
from bergson.search.attributor import Attributor
from tests.helpers.stores import make_cfg


@pytest.fixture(scope="module")
def index(tmp_path_factory, model_dir, corpus_file):
    tmp = tmp_path_factory.mktemp("qindex")
    return build(make_cfg(tmp, model_dir, corpus_file, name="index", save_dtype="float32"))


def test_trace_equals_one_document_store(tmp_path, model_dir, corpus_file, index):
    text = "And God said, Let there be light: and there was light."
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"text": text}) + "\n")
    qstore = build(
        make_cfg(
            tmp_path,
            model_dir,
            corpus_file,
            name="q",
            save_dtype="float32",
            data=DataConfig(dataset=str(qfile)),
        )
    )
    attr = Attributor(index.root)
    ref_scores, ref_idx = attr.search(np.asarray(qstore.all), 5)

    model, tok = load_model(make_cfg(tmp_path, model_dir, corpus_file))
    ids = torch.tensor([tok(text)["input_ids"]])
    with attr.trace(model, 5) as result:
        per_document_loss(model(ids).logits, ids).sum().backward()
    torch.testing.assert_close(result.scores, ref_scores, rtol=1e-4, atol=1e-6)
    assert torch.equal(result.indices, ref_idx)
    np.testing.assert_array_equal(result.row_ids, index.rows["row_id"][ref_idx.numpy()])
    brute = np.asarray(index.all) @ np.asarray(qstore.all)[0]
    np.testing.assert_array_equal(ref_idx[0].numpy(), np.argsort(-brute, kind="stable")[:5])

    # tracing only part of the model searches only the modules it contains
    with attr.trace(model.base_model, 3) as partial:
        per_document_loss(model(ids).logits, ids).sum().backward()
    mods = [m for m in index.modules if m.startswith("gpt_neox.")]  # not the output head
    s, _ = exact_topk(
        index, result.query_vectors[:, : sum(index.dims[m] for m in mods)].numpy(), 3, modules=mods
    )
    np.testing.assert_allclose(partial.scores.numpy(), s, rtol=1e-4)


def test_faiss_flat_equals_exact(index):
    q = np.asarray(index.all)[:3] + 0.01
    exact = Attributor(index.root, unit_norm=True).search(q, 4)
    approx = Attributor(index.root, unit_norm=True, faiss_cfg=FaissConfig("Flat")).search(q, 4)
    assert torch.equal(exact[1], approx[1])
    torch.testing.assert_close(exact[0], approx[0], rtol=1e-4, atol=1e-5)


def test_query_command_writes_records(tmp_path, index):
    out = tmp_path / "hits.jsonl"
    hits = query(
        QueryConfig(index=str(index.root), query="In the beginning God created", top_k=3, output=str(out))
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == hits and len(records) == 3
    assert [r["rank"] for r in records] == [1, 2, 3] and all(r["query"] == 0 for r in records)
    assert records[0]["score"] >= records[1]["score"] >= records[2]["score"]
    assert all(isinstance(r["text"], str) and r["text"] for r in records)
    rev = query(
        QueryConfig(index=str(index.root), query="In the beginning God created", top_k=3, reverse=True)
    )
    assert rev[0]["score"] <= rev[-1]["score"] and rev[0]["score"] < records[-1]["score"]


def test_query_dataset_and_csv(tmp_path, index, corpus_file):
    out = tmp_path / "hits.csv"
    hits = query(
        QueryConfig(
            index=str(index.root),
            query_dataset=str(corpus_file),
            query_split="train[:2]",
            top_k=2,
            unit_normalize=True,
            output=str(out),
        )
    )
    rows = list(csv.DictReader(out.open()))
    assert len(hits) == len(rows) == 4 and list(rows[0]) == ["query", "rank", "row_id", "score", "text"]
    assert [int(r["row_id"]) for r in rows] == [h["row_id"] for h in hits]
    # a training document is its own nearest neighbour by cosine
    assert hits[0]["row_id"] == 0 and hits[2]["row_id"] == 1


def test_query_errors(index):
    with pytest.raises(BergsonError, match="empty"):
        query(QueryConfig(index=str(index.root), query="   "))
    with pytest.raises(BergsonError, match="not a bergson store"):
        query(QueryConfig(index="/nonexistent", query="x y"))
    with pytest.raises(BergsonError, match="--output"):
        query(QueryConfig(index=str(index.root), query="x y", output="hits.txt"))


def test_interactive_query(index):
    proc = subprocess.run(
        [sys.executable, "-m", "bergson", "query", "--index", str(index.root), "--top_k", "2"],
        input="Let there be light\nx\n\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("query>") == 3
    assert "1. score" in proc.stdout and "error:" in proc.stdout  # the one-token query is refused


def test_interactive_prompt_shows_both_ends_and_ends_on_quit(index, monkeypatch, capsys):
    """As in the original package: `exit` or `quit` ends the prompt, and each answer lists the
    bottom of the ranking after its top."""
    answers = iter(["Let there be light", "quit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    hits = query(QueryConfig(index=str(index.root), top_k=2))
    out = capsys.readouterr().out
    assert next(answers) == "never read"  # the prompt stopped at `quit`
    assert len(hits) == 2 and hits[0]["score"] >= hits[1]["score"]
    top, _, bottom = out.partition("the other end of the ranking")
    assert top.count(". score") == 2 and bottom.count(". score") == 2
    lowest = [float(s) for s in re.findall(r"score ([-+][0-9.e+-]+)", bottom)]
    assert max(lowest) < hits[-1]["score"]
