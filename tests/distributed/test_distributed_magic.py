"""`bergson magic` data parallel on two workers (gloo on the CPU) gives what one process gives."""

from __future__ import annotations

import json

import numpy as np
import yaml

from bergson import load_gradients
from bergson.config import DataConfig, MagicConfig, TrainingConfig
from bergson.methods.magic.command import magic
from tests.helpers.distributed import assert_close, cli


def test_magic_on_two_workers_equals_one(tmp_path, model_dir, corpus_file):
    """Each rank takes every other document of each micro-batch (micro-batches of 3: shares of
    2 and 1) in training and in the reverse passes; the same model, metagradients and token
    scores as one process."""
    data = DataConfig(dataset=str(corpus_file), split="train[:12]", truncation=True, max_length=24)
    query = DataConfig(dataset=str(corpus_file), split="train[20:22]", truncation=True, max_length=24)
    training = TrainingConfig(lr=0.01, batch_size=3, grad_accumulation=2, epochs=2, warmup_steps=1)
    cfg = MagicConfig(
        run_path=str(tmp_path / "one"),
        model=str(model_dir),
        precision="fp32",
        data=data,
        query=query,
        training=training,
        query_mode="individual",
        per_token=True,
        checkpoints="sqrt",
    )
    one = magic(cfg)
    two_cfg = tmp_path / "two.yaml"
    from dataclasses import asdict

    two_cfg.write_text(yaml.safe_dump({**asdict(cfg), "run_path": str(tmp_path / "two")}))
    proc = cli("bergson", "magic", str(two_cfg), "--nproc_per_node", "2", "--top_k", "2")
    assert proc.stdout.count("wrote") == 1 and "column 1:" in proc.stdout  # reported once
    two = load_gradients(tmp_path / "two" / "scores")
    assert two.manifest.producer["world_size"] == 2
    np.testing.assert_array_equal(two.rows["row_id"], one.rows["row_id"])
    assert_close(np.asarray(two["scores"]), np.asarray(one["scores"]))
    for i in range(len(one)):
        assert_close(two.token_rows(i), one.token_rows(i))
    t1 = json.loads((tmp_path / "one" / "timings.json").read_text())
    t2 = json.loads((tmp_path / "two" / "timings.json").read_text())
    assert t1["steps"] == t2["steps"] == 4
    assert abs(t1["last_loss"] - t2["last_loss"]) < 1e-5 * abs(t1["last_loss"])
    from safetensors.numpy import load_file

    w1 = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    for k in w1:
        # loose: the attention key bias has an exactly zero gradient, and Adam scales its
        # rounding noise (different for a sum taken in another order) to full-size steps
        np.testing.assert_allclose(w2[k], w1[k], rtol=1e-4, atol=1e-3 * np.abs(w1[k]).max())
    assert not list((tmp_path / "two" / "states").glob("spill*/*"))
    assert t2["graph_steps"] > 0  # the replays kept their graphs

    # a budget of a few bytes: each two-step segment keeps its first step's graph and only the
    # state of its second, whose graph the reverse step rebuilds; both ranks alike (the graphs'
    # sizes are agreed over the ranks, so their collectives pair up), to the same scores
    tight = tmp_path / "tight.yaml"
    tight.write_text(
        yaml.safe_dump({**asdict(cfg), "run_path": str(tmp_path / "tight"), "memory_budget_gb": 4e-9})
    )
    cli("bergson", "magic", str(tight), "--nproc_per_node", "2", "--top_k", "2")
    t3 = json.loads((tmp_path / "tight" / "timings.json").read_text())
    assert t3["graph_steps"] == 2 and t3["replayed_steps"] == 0
    assert_close(
        np.asarray(load_gradients(tmp_path / "tight" / "scores")["scores"]), np.asarray(one["scores"])
    )
