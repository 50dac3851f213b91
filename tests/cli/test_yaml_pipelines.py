"""YAML pipelines (``steps:``) and the original package's option spellings, read as ours.

The shipped ``examples/magic/gpt2_wikitext_tiny.yaml`` (the original README's first command) runs
verbatim against local stand-ins for ``gpt2`` and the WikiText chunks; its run must equal the same
recipe written in bergson's own spelling (a rerun of that spelling finds the run's saved options
identical and reads the scores back unchanged).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from bergson import config as C
from bergson.cli import main, parse
from bergson.config.io import ALIASES, leaf_options
from bergson.errors import BergsonError
from bergson.methods.magic.recipe import learning_rate
from tests.helpers.standins import make_standins

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "magic" / "gpt2_wikitext_tiny.yaml"

OURS = """\
run_path: runs/gpt2_wikitext
model: gpt2
nproc_per_node: 1
data: {dataset: EleutherAI/bergson-wikitext-512-chunks, split: train}
query: {dataset: EleutherAI/bergson-wikitext-512-chunks, split: "test[0:1]"}
training:
  batch_size: 16
  grad_accumulation: 4
  epochs: 1
  schedule: polynomial
  lr: 8.0e-4
  lr_start: 1.0e-6
  lr_end: 8.0e-5
  warmup_steps: 0.25
  seed: 42
  beta1: 0.95
  beta2: 0.975
  eps_root: 1.0e-17
  weight_decay: 0.01
query_mode: individual
"""


def test_the_original_magic_example_runs_verbatim(tmp_path, monkeypatch, caplog):
    make_standins(tmp_path)
    (tmp_path / "examples" / "magic").mkdir(parents=True)
    shutil.copy(EXAMPLE, tmp_path / "examples" / "magic")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    main(["examples/magic/gpt2_wikitext_tiny.yaml"])
    run = tmp_path / "runs" / "gpt2_wikitext"
    from bergson import load_gradients

    scores = np.asarray(load_gradients(run / "scores")["scores"])
    assert scores.shape == (20, 1)  # 20 training chunks, one column for the one query
    assert np.isfinite(scores).all() and np.abs(scores).max() > 0
    announced = json.loads((run / "other_spellings.json").read_text())["announced"]
    assert any(a.startswith("wandb_project='magic' is ignored") for a in announced)
    assert any(a.startswith("double_backward_batch_size=4 is ignored") for a in announced)
    assert any("wandb_project='magic' is ignored" in r.getMessage() for r in caplog.records)

    # the same recipe in bergson's own spelling: the same options (so the run resumes as finished,
    # without training again) and the same scores; any differing option would be refused
    (tmp_path / "ours.yaml").write_text(OURS)
    ours = parse("magic", ["--config", "ours.yaml"])
    saved = C.load_yaml(C.MagicConfig, run / "magic.yaml")
    assert ours == type(ours)(**{**vars(saved), "overwrite": False})
    timings = (run / "timings.json").read_text()
    main(["magic", "--config", "ours.yaml"])
    assert (run / "timings.json").read_text() == timings  # nothing was recomputed
    np.testing.assert_array_equal(np.asarray(load_gradients(run / "scores")["scores"]), scores)
    # `bergson magic FILE.yaml` reads the one-step file as the magic config
    assert parse("magic", ["examples/magic/gpt2_wikitext_tiny.yaml"]) == saved


def test_polynomial_schedule_matches_the_original_formula():
    """8 steps, warmup 0.25 -> 2 steps rising from lr_start, then lr_end + (lr - lr_end)(1 - p)."""
    rec = C.TrainingConfig(schedule="polynomial", lr=8e-4, lr_start=1e-6, lr_end=8e-5, warmup_steps=0.25)
    expected = [1e-6, 1e-6 + (8e-4 - 1e-6) / 2] + [8e-5 + (8e-4 - 8e-5) * (1 - k / 6) for k in range(6)]
    assert [learning_rate(rec, t, 8) for t in range(8)] == pytest.approx(expected, rel=1e-12)
    squared = C.TrainingConfig(schedule="polynomial", lr=1.0, lr_end=0.5, power=2.0, warmup_steps=0)
    assert learning_rate(squared, 2, 4) == pytest.approx(0.5 + 0.5 * 0.25)
    assert (
        math.ceil(3 * 0.25) == 1 and learning_rate(C.TrainingConfig(warmup_steps=0.25, lr=2.0), 0, 3) == 0.0
    )


def test_original_recipe_keys(tmp_path):
    cfg = C.from_dict(
        C.MagicConfig,
        {
            "batch_size": 8, "grad_accum_steps": 2, "num_epochs": 3, "max_grad_norm": None,
            "lr_schedule": {"lr_scheduler_type": "cosine_with_restarts", "warmup_steps": 4},
            "query": {"data": {"dataset": "q", "split": "test"}, "aggregation": "mean"},
            "distributed": {"nproc_per_node": 2, "nnode": 1}, "save_mode": "all", "attribute_tokens": True,
        },
    )  # fmt: skip
    t = cfg.training
    assert (t.batch_size, t.grad_accumulation, t.epochs, t.schedule, t.warmup_steps) == (4, 2, 3, "cosine", 4)
    assert (t.max_grad_norm, t.seed, t.beta1, t.lr) == (0.0, 42, 0.95, 1e-5)  # the original's defaults
    assert (cfg.query.dataset, cfg.query.split, cfg.query_mode) == ("q", "test", "aggregate")
    assert (cfg.nproc_per_node, cfg.checkpoints, cfg.per_token) == (2, "every", True)
    refused = [
        ({"batch_size": 10, "grad_accum_steps": 4}, "multiple of grad_accum_steps"),
        ({"query": {"aggregation": "sum"}}, "query.aggregation='sum' has no counterpart"),
        ({"lr_schedule": {"num_cycles": 1.0}}, "lr_schedule.num_cycles=1.0 is not supported"),
        ({"num_epochs": 2, "training": {"lr": 0.1}}, "mixes the original package's recipe keys"),
        ({"distributed": {"nnode": 2}}, "distributed.nnode=2 is not supported"),
        ({"optimizer": "muon"}, "optimizer='muon' has no counterpart"),
        ({"batch_sizes": 3}, "unknown option(s) batch_sizes"),
    ]
    for values, message in refused:
        with pytest.raises(BergsonError, match=message.replace("(", r"\(").replace(")", r"\)")):
            C.from_dict(C.MagicConfig, values)
    # our own spelling takes our defaults
    assert C.from_dict(C.MagicConfig, {"training": {"lr": 0.1}}).training.seed == 0


def test_every_alias_names_an_option():
    """The table cannot point at options that do not exist (e.g. after a rename)."""
    import importlib

    from bergson.cli import COMMANDS

    classes = [importlib.import_module(c.module).CONFIG for c in COMMANDS.values()]
    targets = set().union(*(leaf_options(cls) for cls in classes))
    for key, alias in ALIASES.items():
        if alias.to and not key.endswith("."):
            assert alias.to in targets, key
        assert alias.to or key.endswith(".") or alias.accepted or alias.ignored, key


def test_original_flags_on_the_command_line(tmp_path):
    build = parse(
        "build",
        [str(tmp_path / "x"), "--index_cfg.precision", "fp32", "--distributed.nproc_per_node", "2",
         "--index_cfg.dataset", "d.jsonl", "--index_cfg.data.split", "train[:3]", "--unit_norm"],
    )  # fmt: skip
    assert (build.precision, build.nproc_per_node, build.data.dataset, build.data.split) == (
        "fp32", 2, "d.jsonl", "train[:3]",
    )  # fmt: skip
    assert build.unit_normalize
    query = parse("query", ["--index", "s", "--faiss", "--faiss_cfg.nprobe", "3", "--record", "r.csv"])
    assert (query.search, query.faiss.nprobe, query.record) == ("faiss", 3, "r.csv")
    magic = parse("magic", ["--batch_size", "8", "--grad_accum_steps", "2", "--lr_schedule.lr", "1e-3"])
    assert (magic.training.batch_size, magic.training.grad_accumulation, magic.training.lr) == (4, 2, 1e-3)
    with pytest.raises(SystemExit):
        parse("build", [str(tmp_path / "x"), "--index_cfg.no_such_option", "1"])


def test_a_pipeline_runs_its_steps_in_order_and_stops_at_the_first_failure(
    tmp_path, model_dir, corpus_file, capsys
):
    from bergson import IndexConfig, build, load_gradients

    data = {"dataset": str(corpus_file), "split": "train[:5]", "truncation": True, "max_length": 24}
    index = {"run_path": str(tmp_path / "idx"), "model": str(model_dir), "precision": "fp32", "device": "cpu",
             "projection_dim": 4, "data": data}  # fmt: skip
    steps = [
        {"build": {"index_cfg": index, "preprocess_cfg": {"unit_normalize": True}}},
        {
            "score": {
                "index_cfg": {"run_path": str(tmp_path / "s")},
                "index": str(tmp_path / "idx"),
                "query_path": str(tmp_path / "missing"),
            }
        },
        {"build": {"index_cfg": {**index, "run_path": str(tmp_path / "never")}}},
    ]
    pipeline = tmp_path / "pipeline.yaml"
    import yaml

    pipeline.write_text(yaml.safe_dump({"steps": steps}))
    with pytest.raises(SystemExit) as exit_:
        main([str(pipeline)])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "step 2/3 (score): error:" in err and "missing" in err and "Traceback" not in err
    assert not (tmp_path / "never").exists()
    direct = build(IndexConfig(**{**index, "run_path": str(tmp_path / "direct"), "data": C.DataConfig(**data)},
                               unit_normalize=True))  # fmt: skip
    np.testing.assert_array_equal(np.asarray(load_gradients(tmp_path / "idx").all), np.asarray(direct.all))
    # a command word in front of a pipeline of other commands is refused, naming the fix
    with pytest.raises(SystemExit):
        main(["magic", str(pipeline)])
    assert f"run it as `bergson {pipeline}`" in capsys.readouterr().err


def test_a_pipeline_in_the_original_spelling_builds_then_queries_with_faiss_and_record(
    tmp_path, model_dir, corpus_file
):
    """build (index_cfg nesting) then query (faiss: true, record), with a top-level run_path: the
    FAISS index is built beside the store, the recorded top hits are the exact search's (a Flat
    index is exact), and the resolved pipeline written to run_path runs again."""
    import csv

    import yaml

    from bergson import QueryConfig
    from bergson.querying import query

    text = "The river flows through the old town"
    data = {"dataset": str(corpus_file), "split": "train[:8]", "truncation": True, "max_length": 24}
    model = {"model": str(model_dir), "precision": "fp32", "device": "cpu"}
    store, record = tmp_path / "idx", tmp_path / "hits.csv"
    steps = [
        {"build": {"index_cfg": {"run_path": str(store), **model, "projection_dim": 4, "data": data}}},
        {"query": {"index": str(store), **model, "query": text, "top_k": 3, "faiss": True,
                   "faiss_cfg": {"index_factory": "Flat"}, "record": str(record), "unit_norm": True}},
    ]  # fmt: skip
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"run_path": str(tmp_path / "pipe"), "steps": steps}))
    main([str(pipeline)])
    assert list((store / "faiss").glob("Flat-unit*"))
    exact = query(QueryConfig(index=str(store), query=text, top_k=3, unit_normalize=True, **model))
    rows = list(csv.DictReader(record.open()))
    top = [(int(r["result_index"]), float(r["score"])) for r in rows if r["direction"] == "Top"]
    assert [t[0] for t in top] == [h["row_id"] for h in exact]
    np.testing.assert_allclose([t[1] for t in top], [h["score"] for h in exact], rtol=1e-4)
    resolved = yaml.safe_load((tmp_path / "pipe" / "pipeline.yaml").read_text())
    assert [next(iter(s)) for s in resolved["steps"]] == ["build", "query"]
    assert resolved["steps"][1]["query"]["search"] == "faiss"
    main([str(tmp_path / "pipe" / "pipeline.yaml")])  # in bergson's spelling: the store is reused
    assert len(list(csv.DictReader(record.open()))) == 2 * len(rows)
