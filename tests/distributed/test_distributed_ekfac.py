"""`bergson ekfac` on two workers (torch.distributed, gloo on the CPU) gives what one process gives,
with EK-FAC's own iHVP and with ASTRA's and LiSSA's iterations."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from bergson import load_gradients
from bergson.transforms.ekfac import Factors
from tests.helpers.distributed import assert_close, cli, ekfac_cli, ekfac_one


def assert_same_factors(one: Path, two: Path, keys: tuple[str, ...]) -> None:
    a, b = Factors.load(one), Factors.load(two)
    assert a.meta == b.meta and sorted(a.tensors) == sorted(b.tensors)
    for name in a.tensors:
        for key in keys:
            assert_close(b.tensors[name][key].numpy(), a.tensors[name][key].numpy())


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


@pytest.mark.parametrize(
    "method", ["astra"]
)  # lissa and pcg share every distributed step (one launch is ~15 s)
def test_iterative_ihvp_on_two_workers_equals_one(tmp_path, model_dir, corpus_file, method):
    """--ihvp astra (lissa and pcg run the same passes, only the update differs): the query products run on rank 0 over every document, so two
    workers give one process's queries and scores (up to the rounding of the summed passes, kept
    small with float64 factors: in float32 the iterations amplify it to ~3e-4 relative on a few
    entries); a run that lost its queries and scores resumes to identical ones."""
    options = dict(ihvp=method, ihvp_steps=3, factor_dtype="float64")
    one = ekfac_one(tmp_path / "one", model_dir, corpus_file, "train[:8]", 128, **options)
    out = tmp_path / "two"
    cli(
        *ekfac_cli(out, model_dir, corpus_file, "train[:8]", "128", "--ihvp", method, "--ihvp_steps", "3",
                   "--factor_dtype", "float64", "--nproc_per_node", "2")
    )  # fmt: skip
    a, b = Factors.load(tmp_path / "one" / "queries"), Factors.load(out / "queries")
    res_a, res_b = a.meta.pop("ihvp_residuals"), b.meta.pop("ihvp_residuals")
    assert a.meta == b.meta and a.meta["ihvp"] == method and len(res_a) == 3
    assert_close(np.asarray(res_b), np.asarray(res_a))
    assert res_a[0] == 1.0 and len(set(res_a)) == 3  # three steps ran
    for name in a.tensors:
        for key in a.tensors[name]:
            assert_close(b.tensors[name][key].numpy(), a.tensors[name][key].numpy())
    two = load_gradients(out / "scores")
    assert two.manifest.producer["world_size"] == 2 and two.manifest.score["ihvp"] == method
    assert_close(np.asarray(two["scores"]), np.asarray(one["scores"]))

    # a run that lost its last two stages: the iterations redone alike, to the same scores
    before = np.asarray(one["scores"]).copy()
    stamp = (tmp_path / "one" / "corrected" / "factors.json").stat().st_mtime_ns
    shutil.rmtree(tmp_path / "one" / "queries")
    shutil.rmtree(tmp_path / "one" / "scores")
    again = ekfac_one(tmp_path / "one", model_dir, corpus_file, "train[:8]", 128, **options)
    assert (tmp_path / "one" / "corrected" / "factors.json").stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(np.asarray(again["scores"]), before)
