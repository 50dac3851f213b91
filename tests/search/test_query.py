"""The Attributor and `bergson query`."""

from __future__ import annotations

import csv
import json
import re
import shutil
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

    # the default store holds the transformer body only, so the README's trace(model.base_model)
    # covers every store module and gives the whole model's scores
    assert index.manifest.model["output_head"] == {"modules": ["lm_head"], "tracked": []}
    assert index.manifest.model["base_model"] == "gpt_neox" and "lm_head" not in index.modules
    with attr.trace(model.base_model, 5) as body:
        per_document_loss(model(ids).logits, ids).sum().backward()
    torch.testing.assert_close(body.scores, result.scores, rtol=1e-6, atol=1e-9)
    assert torch.equal(body.indices, result.indices)


def _query_loss(model, tok, text="And God said, Let there be light: and there was light."):
    ids = torch.tensor([tok(text)["input_ids"]])
    return lambda: per_document_loss(model(ids).logits, ids).sum().backward()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, model_dir, corpus_file):
    return load_model(make_cfg(tmp_path_factory.mktemp("m"), model_dir, corpus_file, precision="fp32"))


def test_readme_faiss_trace_of_base_model(index, loaded):
    """The README's FAISS snippet, verbatim, against a default build: it searches every module."""
    model, tok = loaded
    backward = _query_loss(model, tok)
    exact = Attributor(index.root)
    with exact.trace(model, 3) as ref:
        backward()
    attr = Attributor(index.root, faiss_cfg=FaissConfig("IVF1,SQfp16", mmap_index=True))
    with attr.trace(model.base_model, 3) as result:
        backward()
        model.zero_grad()
    # IVF1 visits every row; SQfp16 rounds the stored vectors to float16 (as the store already is)
    assert torch.equal(result.indices, ref.indices)
    torch.testing.assert_close(result.scores, ref.scores, rtol=1e-3, atol=1e-3)


def test_trace_of_a_part_that_misses_store_modules_is_an_error(
    tmp_path, model_dir, corpus_file, index, loaded
):
    """A store built with --include_output_head holds lm_head, which model.base_model lacks: tracing it is
    an error naming the head and the fix, for exact and FAISS search alike, never a partial score."""
    model, tok = loaded
    backward = _query_loss(model, tok)
    store = build(
        make_cfg(
            tmp_path, model_dir, corpus_file, name="head", save_dtype="float32", include_output_head=True
        )
    )
    assert store.modules == [*index.modules, "lm_head"]
    assert store.manifest.model["output_head"] == {"modules": ["lm_head"], "tracked": ["lm_head"]}
    # the same body columns; to rounding, as the untracked head's loss takes the fused route
    body_cols = np.asarray(store.all)[:, : index.manifest.total_dim]
    np.testing.assert_allclose(body_cols, np.asarray(index.all), rtol=1e-4, atol=1e-5)
    for faiss_cfg in (None, FaissConfig("IVF1,SQfp16", mmap_index=True)):
        attr = Attributor(store.root, faiss_cfg=faiss_cfg)
        with (
            pytest.raises(
                BergsonError,
                match=r"\['lm_head'\]: the output head.*trace the whole model.*--include_output_head",
            ),
            attr.trace(model.base_model, 3),
        ):
            backward()
        with attr.trace(model, 3) as whole:
            backward()
        assert whole.scores.shape == (1, 3)
    # restricted to the body's modules (spelled from the base model), the part may be traced
    attr = Attributor(store.root, modules=["layers.*"])
    with attr.trace(model.base_model, 3) as body:
        backward()
    with Attributor(index.root).trace(model, 3) as ref:
        backward()
    assert torch.equal(body.indices, ref.indices)
    torch.testing.assert_close(body.scores, ref.scores, rtol=1e-5, atol=1e-6)


def test_store_module_names_in_either_spelling(tmp_path, model_dir, corpus_file, index, loaded):
    """modules= of the Attributor and exact_topk take names spelled from the model or its base model,
    and a store whose manifest spells its modules from the base model (as the original package did)
    is traced through the model or model.base_model alike."""
    mlp = [m for m in index.modules if ".mlp." in m]
    q = np.random.default_rng(0).standard_normal((2, sum(index.dims[m] for m in mlp)))
    full = Attributor(index.root, modules=mlp).search(q, 3)
    rel = Attributor(index.root, modules=["layers.*.mlp.*"]).search(q, 3)
    assert torch.equal(full[1], rel[1]) and torch.equal(full[0], rel[0])
    one = q[:, : index.dims[mlp[0]]]
    a = exact_topk(index, one, 2, modules=[mlp[0]])
    b = exact_topk(index, one, 2, modules=[mlp[0].removeprefix("gpt_neox.")])
    np.testing.assert_array_equal(a[1], b[1])
    brute = np.asarray(index[mlp[0]], np.float64) @ one.T
    np.testing.assert_array_equal(a[1], np.argsort(-brute, axis=0, kind="stable")[:2].T)
    with pytest.raises(BergsonError, match=r"no module 'layers\.9\.\*' in the store.*'gpt_neox\.layers\.0"):
        Attributor(index.root, modules=["layers.9.*"])

    # a store whose manifest spells its modules from the base model; full gradients (p = 0), as the
    # projection of a projected store depends on the names it was built under
    full_store = build(
        make_cfg(tmp_path, model_dir, corpus_file, name="full", projection_dim=0, modules=["layers.1.mlp.*"])
    )
    assert full_store.modules == [
        "gpt_neox.layers.1.mlp.dense_h_to_4h",
        "gpt_neox.layers.1.mlp.dense_4h_to_h",
    ]
    rel_root = tmp_path / "relative"
    shutil.copytree(full_store.root, rel_root)
    manifest = json.loads((rel_root / "manifest.json").read_text())
    for m in manifest["modules"]:
        m["name"] = m["name"].removeprefix("gpt_neox.")
    del manifest["model"]["base_model"], manifest["model"]["output_head"]
    (rel_root / "manifest.json").write_text(json.dumps(manifest))
    model, tok = loaded
    backward = _query_loss(model, tok)
    with Attributor(full_store.root).trace(model, 4) as ref:
        backward()
    for part in (model, model.base_model):
        with Attributor(rel_root).trace(part, 4) as got:
            backward()
        assert torch.equal(got.indices, ref.indices)
        torch.testing.assert_close(got.scores, ref.scores, rtol=1e-6, atol=1e-9)


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
