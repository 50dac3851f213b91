"""`bergson trak` on two workers (torch.distributed, gloo on the CPU) gives what one process gives,
per token too; a run that lost its last steps resumes to the same scores."""

from __future__ import annotations

import re
import shutil

import numpy as np

from bergson import TrakConfig, load_gradients, trak
from bergson.config import DataConfig
from tests.helpers.distributed import assert_close, cli


def test_trak_on_two_workers_equals_one(tmp_path, model_dir, corpus_file):
    """Each rank builds its shards of the stores, rank 0 solves: the same stores, scores and token
    scores as one process; deleting the last steps' outputs and rerunning gives the same scores
    and token scores without rebuilding the stores."""
    data = DataConfig(dataset=str(corpus_file), split="train[:12]", truncation=True, max_length=32)
    query = DataConfig(dataset=str(corpus_file), split="train[20:23]", truncation=True, max_length=32)
    options = dict(projection_dim=2, precision="fp32", token_batch_size=128, shard_size=3, per_token=True)
    cfg = TrakConfig(run_path=str(tmp_path / "one"), model=str(model_dir), data=data, query=query, **options)
    one = trak(cfg)
    out = tmp_path / "two"
    args = (
        "bergson", "trak", str(out), "--model", str(model_dir), "--dataset", str(corpus_file), "--split",
        "train[:12]", "--truncation", "--max_length", "32", "--query.dataset", str(corpus_file),
        "--query.split", "train[20:23]", "--query.truncation", "--query.max_length", "32",
        "--projection_dim", "2", "--precision", "fp32", "--token_batch_size", "128", "--shard_size", "3",
        "--per_token", "--nproc_per_node", "2",
    )  # fmt: skip
    proc = cli(*args)
    # the training store's four shards are split between the ranks
    shares = {int(r): int(n) for r, n in re.findall(r"rank (\d) of 2: (\d) of 4 shards", proc.stderr)}
    assert sorted(shares) == [0, 1] and sum(shares.values()) == 4 and min(shares.values()) >= 1
    assert proc.stdout.count("wrote") == 1

    train_one, train_two = (
        load_gradients(tmp_path / "one" / "model_0" / "train"),
        load_gradients(out / "model_0" / "train"),
    )
    assert train_two.manifest.producer["world_size"] == 2 and len(train_two.manifest.shards) == 4
    order_one, order_two = np.argsort(train_one.rows["row_id"]), np.argsort(train_two.rows["row_id"])
    assert_close(np.asarray(train_two.all)[order_two], np.asarray(train_one.all)[order_one])
    two = load_gradients(out / "scores")
    assert two.has_tokens and len(two) == 12
    np.testing.assert_array_equal(two.rows["num_tokens"], one.rows["num_tokens"])
    assert_close(np.asarray(two["scores"]), np.asarray(one["scores"]))
    for i in range(len(one)):
        assert_close(two.token_rows(i), one.token_rows(i))

    # resume (in this process): the stores are kept, the lost scores are solved again, identically
    before = np.asarray(one["scores"]).copy()
    tokens = [np.asarray(one.token_rows(i)).copy() for i in range(len(one))]
    stamp = (tmp_path / "one" / "model_0" / "train" / "manifest.json").stat().st_mtime_ns
    shutil.rmtree(tmp_path / "one" / "model_0" / "scores")
    shutil.rmtree(tmp_path / "one" / "scores")
    again = trak(cfg)
    assert (tmp_path / "one" / "model_0" / "train" / "manifest.json").stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(np.asarray(again["scores"]), before)
    for i in range(len(again)):
        np.testing.assert_array_equal(np.asarray(again.token_rows(i)), tokens[i])
