"""The original bergson package's README, typed verbatim: every command and snippet runs against
local stand-ins named like its hub ids, and each result is checked (the source document of a
query is its top hit, TrackStar finds each query in the corpus, the Trainer callback's store
equals a separate build, the per-head blocks equal the module's gradient split by hand)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.helpers.cli import run_in_process
from tests.helpers.original_readme import (
    ATTENTION_HEADS,
    ATTRIBUTOR,
    ATTRIBUTOR_FAISS,
    CALLBACK,
    CLI_CASES,
    QUERY_ROW,
    make_workdir,
    on_cpu,
    texts_of,
)
from tests.helpers.standins import PYTHIA, TINYSTORIES

REPO = Path(__file__).resolve().parents[2]


_texts = texts_of


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The stand-ins, the README's example YAML and two small data files, as a user's directory."""
    return make_workdir(tmp_path_factory.mktemp("original_readme"), REPO)


# The README's first command, typed as `python -m bergson`, runs in a fresh interpreter (the
# module entry point, the exit status the shell sees); the others go through the same entry point
# (bergson.cli.main) in this process, from the same directory with the same stdin, which spares a
# fresh interpreter's imports per command. An exception escaping main would show as a traceback on
# stderr with status 1, as in a subprocess.
SUBPROCESS_CASES = {"quickstart (older README)"}

# Both MAGIC cases run the README's one YAML, whose run_path is fixed: each run is moved aside
# after it ends, so that the next one starts from nothing rather than finding the store complete.
MAGIC_CASES = ("quickstart magic", "pipeline YAML (later README)")
MAGIC_RUN = "runs/gpt2_wikitext"


def magic_run_of(workdir: Path, case: str) -> Path:
    return workdir / f"{MAGIC_RUN}-{MAGIC_CASES.index(case)}"


@pytest.fixture(scope="module")
def cli(workdir) -> dict[str, subprocess.CompletedProcess]:
    """Every command of the README, in its order, from the user's directory."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    query = _texts(workdir)[QUERY_ROW]
    out = {}
    for case in CLI_CASES:
        argv = list(case.argv)
        stdin = case.stdin.replace("QUERY", query) if case.stdin else ""
        if argv[0] == "python":
            assert argv[1:3] == ["-m", "bergson"], argv
        if case.name not in SUBPROCESS_CASES:
            out[case.name] = run_in_process(
                *argv[3 if argv[0] == "python" else 1 :], check=False, cwd=workdir, stdin=stdin
            )
            if case.name in MAGIC_CASES and (workdir / MAGIC_RUN).exists():
                shutil.move(workdir / MAGIC_RUN, magic_run_of(workdir, case.name))
            continue
        if argv[0] == "bergson":
            argv = [sys.executable, "-m", "bergson", *argv[1:]]
        elif argv[0] == "python":
            argv[0] = sys.executable
        out[case.name] = subprocess.run(
            argv, cwd=workdir, env=env, input=stdin, capture_output=True, text=True, timeout=600
        )
    assert set(out) >= SUBPROCESS_CASES
    return out


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _store(path: Path):
    from bergson.store import load_gradients

    return load_gradients(path)


BODY = re.compile(r"^gpt_neox\.layers\.\d+\.")


@pytest.mark.parametrize(
    "name,run,projection",
    [
        ("quickstart (older README)", "runs/test", 16),
        ("quickstart build", "runs/index", 16),
        ("quickstart build, projected", "runs/index16", 16),
        ("usage build", "runs/usage", 16),
    ],
)
def test_builds_track_the_transformer_body(cli, workdir, name, run, projection):
    """Every build of the README writes one row per document over the layers inside base_model
    (the original's default), and says which of its defaults differ from the original's."""
    text = _ok(cli[name])
    store = _store(workdir / run)
    assert len(store) == len(_texts(workdir))
    assert store.modules and all(BODY.match(m) for m in store.modules), store.modules
    assert all(store.dims[m] == projection * projection for m in store.modules)
    assert "original" in text and "projection_dim" in text  # the differing default is announced


@pytest.mark.parametrize("name", ["quickstart query", "index query with --model"])
def test_query_finds_its_source_document(cli, name):
    text = _ok(cli[name])
    first = re.search(r"^\s*1\.\s+score\s+\S+\s+row\s+(\d+)", text, re.M)
    assert first, text[-2000:]
    assert int(first.group(1)) == QUERY_ROW


def test_trackstar_finds_each_query_in_the_corpus(cli, workdir):
    _ok(cli["quickstart trackstar"])
    hits = [json.loads(line) for line in (workdir / "runs/trackstar/top_k.jsonl").read_text().splitlines()]
    tops = {}
    for hit in hits:
        if hit["rank"] == 1:
            tops[hit["query"]] = hit["row_id"]
    assert len(tops) == 20
    assert all(tops[q] == q for q in tops), tops


@pytest.mark.parametrize("name", ["quickstart magic", "pipeline YAML (later README)"])
def test_magic_yaml_runs(cli, workdir, name):
    _ok(cli[name])
    assert not (workdir / MAGIC_RUN).exists()  # each case ran into an empty run directory
    scores = _store(magic_run_of(workdir, name) / "scores")
    values = np.asarray(scores.all)
    assert values.shape == (20, 1)  # 20 training chunks, one query (test[0:1])
    assert np.isfinite(values).all() and np.abs(values).max() > 0


def test_prompt_completion_and_rewards(cli, workdir):
    _ok(cli["prompt and completion columns"])
    assert len(_store(workdir / "runs/pairs")) == 8
    _ok(cli["GRPO rewards"])
    # each text sampled twice with rewards 1 and 0: advantages +1/2 and -1/2 of the same gradient
    grpo = _store(workdir / "runs/grpo")
    assert len(grpo) == 8
    by_row = dict(zip(grpo.rows["row_id"].tolist(), np.asarray(grpo.all, np.float64), strict=True))
    for i in range(4):
        up, down = by_row[2 * i], by_row[2 * i + 1]
        assert np.abs(up).max() > 0
        np.testing.assert_allclose(up, -down, rtol=2e-3, atol=2e-3 * np.abs(up).max())


def test_on_the_fly_reduce_and_score(cli, workdir):
    _ok(cli["on-the-fly reduce"])
    reduced = _store(workdir / "runs/reduced")
    assert len(reduced) == 1
    # the mean of the documents' unit-normalized vectors, as a build gives them
    built = np.asarray(_store(workdir / "runs/usage").all, np.float64)
    unit = built / np.linalg.norm(built, axis=1, keepdims=True)
    np.testing.assert_allclose(
        np.asarray(reduced.all[0], np.float64), unit.mean(0), rtol=1e-2, atol=1e-3 * np.abs(unit).max()
    )
    _ok(cli["on-the-fly score"])
    scores = np.asarray(_store(workdir / "runs/scored").all, np.float64)
    assert scores.shape == (len(_texts(workdir)), 1)
    # the scores are each document's gradient against the reduced query
    expected = built @ np.asarray(reduced.all[0], np.float64)
    np.testing.assert_allclose(scores[:, 0], expected, rtol=2e-2, atol=2e-2 * np.abs(expected).max())


def test_diagnostic_and_its_follow_ups(cli):
    assert "consistent" in _ok(cli["diagnostic"])
    for name in (
        "diagnostic follow-up: math SDPA",
        "diagnostic follow-up: fp32 + TF32",
        "diagnostic follow-up: fp32",
    ):
        proc = cli[name]
        # the README gives no --dataset: the error names the flag and the fix, without a traceback
        assert proc.returncode != 0
        assert "--dataset" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Python snippets


def _exec(snippet: str, namespace: dict[str, Any], workdir: Path) -> dict[str, Any]:
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        exec(compile(on_cpu(snippet), "README snippet", "exec"), namespace)
    finally:
        os.chdir(cwd)
    return namespace


def test_attributor_snippets(cli, workdir):
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bergson.collect.losses import per_document_loss

    _ok(cli["quickstart build, projected"])
    model = AutoModelForCausalLM.from_pretrained(workdir / PYTHIA)
    tokenizer = AutoTokenizer.from_pretrained(workdir / PYTHIA)
    query = _texts(workdir)[QUERY_ROW]
    ns = _exec(
        ATTRIBUTOR,
        {
            "args": SimpleNamespace(index="runs/index16"),
            "model": model,
            "tokenizer": tokenizer,
            "query": query,
        },
        workdir,
    )
    result = ns["result"]
    ids = ns["query_tokens"]
    # the same as tracing the whole model on the document's summed loss (the store's loss), scaled by
    # the mean the README's `.loss` takes
    attr = ns["attr"]
    with attr.trace(model, 5) as whole:
        per_document_loss(model(ids).logits, ids).sum().backward()
    model.zero_grad()
    assert torch.equal(result.indices, whole.indices)
    torch.testing.assert_close(result.scores * (ids.shape[1] - 1), whole.scores, rtol=1e-3, atol=1e-5)

    pytest.importorskip("faiss")
    ns = _exec(ATTRIBUTOR_FAISS, ns, workdir)
    assert torch.equal(ns["result"].indices, result.indices)
    torch.testing.assert_close(ns["result"].scores, result.scores, rtol=2e-3, atol=1e-5)


def test_callback_snippet_store_equals_build(workdir):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from bergson.store import load_gradients
    from tests.helpers.trainer import _build, _close

    tok = AutoTokenizer.from_pretrained(workdir / PYTHIA)
    ids = [tok(t)["input_ids"][:24] for t in _texts(workdir)[:8]]
    dataset = Dataset.from_dict({"input_ids": ids, "labels": ids})
    model = AutoModelForCausalLM.from_pretrained(workdir / PYTHIA)
    initial = copy.deepcopy(model.state_dict())
    training_args = TrainingArguments(
        output_dir=str(workdir / "runs/trainer"),
        per_device_train_batch_size=4,
        num_train_epochs=1,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    ns = _exec(
        CALLBACK,
        {"Trainer": Trainer, "model": model, "training_args": training_args, "dataset": dataset},
        workdir,
    )
    callback = ns["callback"]
    (store_path,) = [workdir / s for s in callback.stores]  # relative to where the snippet ran
    store = load_gradients(store_path)
    assert len(store) == 8
    import pyarrow.parquet as pq

    order = pq.read_table(Path(store_path) / "order.parquet").to_pandas()
    first = order[order.step == 0].row.tolist()
    built = _build(workdir, "runs/trainer-build", initial, first, None, ids)
    assert list(store.modules) == list(built.modules)
    _close(np.asarray(store.all[first], np.float64), np.asarray(built.all[:], np.float64), rtol=2e-3)


def test_attention_head_snippet(workdir):
    from transformers import AutoTokenizer

    import bergson
    from bergson.store import load_gradients

    tok = AutoTokenizer.from_pretrained(workdir / TINYSTORIES)
    from datasets import Dataset

    data = Dataset.from_dict({"input_ids": [tok(t)["input_ids"][:20] for t in _texts(workdir)[:4]]})
    processor = bergson.GradientProcessor(projection_dim=0)
    ns = _exec(
        ATTENTION_HEADS,
        {"collect_gradients": bergson.collect_gradients, "data": data, "processor": processor},
        workdir,
    )
    store = load_gradients(workdir / "runs/split_attention")
    name = "transformer.h.0.attn.attention.out_proj"
    heads = [m for m in store.modules if m.startswith(name + ".head")]
    assert len(heads) == 16
    # each head's block is its 4 output rows of the module's full gradient (head_dim=2 in the
    # original: heads along the output features of the (out, in) weight)
    model = ns["model"]
    weight = dict(model.named_modules())[name].weight
    ids = torch.tensor([data[0]["input_ids"]])
    from bergson.collect.losses import per_document_loss

    model.zero_grad()
    per_document_loss(model(ids).logits, ids).sum().backward()
    full = weight.grad.detach().double()  # (out 64, in 64)
    for h, block in enumerate(heads):
        got = np.asarray(store[block][0], np.float64)
        np.testing.assert_allclose(got, full[4 * h : 4 * h + 4].flatten().numpy(), rtol=1e-3, atol=1e-6)
