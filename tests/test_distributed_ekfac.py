"""`bergson ekfac` on two workers (torch.distributed, gloo on the CPU) gives what one process gives."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np

from bergson import EkfacConfig, ekfac, load_gradients
from bergson.config import DataConfig
from bergson.transforms.ekfac import Factors

from .test_distributed import cli


def assert_close(b: np.ndarray, a: np.ndarray) -> None:
    """Equal up to the float rounding of sums taken in another order."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * max(np.abs(a).max(), 1e-30))


def assert_same_factors(one: Path, two: Path, keys: tuple[str, ...]) -> None:
    a, b = Factors.load(one), Factors.load(two)
    assert a.meta == b.meta and sorted(a.tensors) == sorted(b.tensors)
    for name in a.tensors:
        for key in keys:
            assert_close(b.tensors[name][key].numpy(), a.tensors[name][key].numpy())


def ekfac_cli(
    out: Path, model_dir: Path, corpus_file: Path, split: str, token_batch_size: str, *extra: str
) -> tuple[str, ...]:
    """``bergson ekfac OUT`` on the documents ``split`` (and queries 20-22) of the test corpus,
    cut to 32 tokens, tracking the transformer layers."""
    return (
        "bergson", "ekfac", str(out), "--model", str(model_dir), "--dataset", str(corpus_file), "--split",
        split, "--truncation", "--max_length", "32", "--token_batch_size", token_batch_size,
        "--query.dataset", str(corpus_file), "--query.split", "train[20:23]", "--query.truncation",
        "--query.max_length", "32", "--modules", "gpt_neox.layers.*", *extra,
    )  # fmt: skip


def ekfac_one(out: Path, model_dir: Path, corpus_file: Path, split: str, token_batch_size: int, **options):
    """The one-process run (in this process) that :func:`ekfac_cli` ``out ... split token_batch_size``
    describes, with further ``EkfacConfig`` options."""
    data = DataConfig(dataset=str(corpus_file), split=split, truncation=True, max_length=32)
    query = DataConfig(dataset=str(corpus_file), split="train[20:23]", truncation=True, max_length=32)
    cfg = EkfacConfig(
        run_path=str(out),
        model=str(model_dir),
        data=data,
        query=query,
        token_batch_size=token_batch_size,
        modules=["gpt_neox.layers.*"],
        **options,
    )
    return ekfac(cfg)


def test_ekfac_on_two_workers_equals_one(tmp_path, model_dir, corpus_file):
    """Documents split by tokens, sums all-reduced, rank 0 writes: the same factors, corrected
    eigenvalues and scores (and token rows) as one process; a rerun resumes on both ranks."""
    one = ekfac_one(
        tmp_path / "one", model_dir, corpus_file, "train[:12]", 128, per_token=True, per_module_scores=True
    )
    out = tmp_path / "two"
    args = ekfac_cli(
        out, model_dir, corpus_file, "train[:12]", "128",
        "--per_token", "--per_module_scores", "--top_k", "2", "--nproc_per_node", "2",
    )  # fmt: skip
    proc = cli(*args)
    # each rank logs its share of the documents: together all twelve
    shares = {int(r): int(n) for r, n in re.findall(r"rank (\d) of 2: (\d+) of 12 documents", proc.stderr)}
    assert sorted(shares) == [0, 1] and sum(shares.values()) == 12 and min(shares.values()) >= 4
    assert proc.stdout.count("wrote") == 1 and "query 2:" in proc.stdout  # the launcher reports once

    assert_same_factors(tmp_path / "one" / "covariances", out / "covariances", ("A", "S"))
    assert_same_factors(tmp_path / "one" / "corrected", out / "corrected", ("eigenvalues",))
    two = load_gradients(out / "scores")
    assert two.manifest.producer["world_size"] == 2
    np.testing.assert_array_equal(two.rows["row_id"], one.rows["row_id"])
    np.testing.assert_array_equal(two.rows["num_tokens"], one.rows["num_tokens"])
    assert_close(np.asarray(two["scores"]), np.asarray(one["scores"]))
    assert two.has_tokens
    for i in range(len(one)):
        assert_close(two.token_rows(i), one.token_rows(i))
    parts_one, parts_two = np.load(tmp_path / "one" / "per_module.npz"), np.load(out / "per_module.npz")
    assert sorted(parts_two.files) == sorted(parts_one.files)
    for key in parts_one.files:
        assert_close(parts_two[key], parts_one[key])

    # resume: the completed stages are skipped by both ranks, the missing ones redone alike
    stamp = (out / "eigen" / "factors.json").stat().st_mtime_ns
    shutil.rmtree(out / "corrected")
    shutil.rmtree(out / "scores")
    cli(*args)
    assert (out / "eigen" / "factors.json").stat().st_mtime_ns == stamp
    assert_same_factors(tmp_path / "one" / "corrected", out / "corrected", ("eigenvalues",))
    assert_close(np.asarray(load_gradients(out / "scores")["scores"]), np.asarray(one["scores"]))
