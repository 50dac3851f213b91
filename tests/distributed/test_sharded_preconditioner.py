"""``bergson preconditioner --shard_preconditioners`` on two workers: each rank fits and saves
its own modules' blocks, and the whole equals the one-process fit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bergson.config import PreconditionerConfig, options_of
from bergson.preconditioning import fit_preconditioner
from bergson.transforms.preconditioners import META_FILE, TENSORS_FILE, load_preconditioner, part_file
from tests.helpers.distributed import one_cfg


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, model_dir, corpus_file):
    """The options of a small fit, and its sharded fit on two workers (the directory and the result)."""
    tmp = tmp_path_factory.mktemp("sharded")
    base = one_cfg(tmp, model_dir, corpus_file, "one")
    root = tmp / "sharded"
    two = fit_preconditioner(
        options_of(
            PreconditionerConfig, base, run_path=str(root), nproc_per_node=2, shard_preconditioners=True
        )
    )
    return base, root, two


def test_sharded_fit_on_two_workers_equals_one_process(sharded, caplog):
    base, root, two = sharded
    one = fit_preconditioner(options_of(PreconditionerConfig, base, shard_preconditioners=True))
    assert "one process; nothing to shard" in caplog.text
    meta = json.loads((root / META_FILE).read_text())
    parts = [part_file(r, 2) for r in (0, 1)]
    assert sorted(meta["shards"]) == parts and not (root / TENSORS_FILE).exists()
    held = [set(meta["shards"][p]) for p in parts]
    assert held[0] and held[1] and not held[0] & held[1] and held[0] | held[1] == set(one.modules)
    # each rank held less than the whole; the hash of the parts is that of the loaded whole
    sharding = meta["sharding"]
    assert max(sharding["statistics_bytes_per_rank"]) < sharding["unsharded_statistics_bytes"]
    assert meta["sha256"] == two.identity() == load_preconditioner(root).identity()
    assert two.num_rows == one.num_rows == 24 and two.modules == one.modules
    for name in one.modules:
        a, b = one.second_moments[name].numpy(), two.second_moments[name].numpy()
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())
        # eigenvectors up to sign: the projections onto them are equal
        lam_a, lam_b = one.eigenvalues[name].numpy(), two.eigenvalues[name].numpy()
        np.testing.assert_allclose(lam_b, lam_a, rtol=1e-4, atol=1e-6 * lam_a.max())


def test_sharded_fit_preconditions_queries_on_the_ranks_owning_its_blocks(
    tmp_path, sharded, model_dir, corpus_file
):
    """Scoring on two workers with a sharded fit: each rank loads and applies only its own blocks
    (H^-1 on the queries), and the scores equal one process's with the whole fit."""
    from bergson import ScoreConfig, build, load_gradients, score
    from bergson.config import DataConfig
    from tests.helpers.stores import make_cfg

    base = one_cfg(tmp_path, model_dir, corpus_file, "one")
    root = tmp_path / "sharded"
    fit_preconditioner(
        options_of(
            PreconditionerConfig, base, run_path=str(root), nproc_per_node=2, shard_preconditioners=True
        )
    )
    qdata = DataConfig(dataset=str(corpus_file), split="train[3:6]", truncation=True)
    query = build(make_cfg(tmp_path, model_dir, corpus_file, name="query", save_dtype="float32", data=qdata))
    common = {**vars(base), "query_path": str(query.root), "preconditioner_path": str(root)}
    one = score(ScoreConfig(**{**common, "run_path": str(tmp_path / "s1")}))
    two = score(ScoreConfig(**{**common, "run_path": str(tmp_path / "s2"), "nproc_per_node": 2}))
    two = load_gradients(two.root if two is not None else tmp_path / "s2")
    info = two.manifest.preconditioner
    assert info["applied_sharded"]["ranks"] == 2 and min(info["applied_sharded"]["blocks_per_rank"]) > 0
    assert info["sha256"] == one.manifest.preconditioner["sha256"] == load_preconditioner(root).identity()
    a, b = np.asarray(one["scores"], np.float64), np.asarray(two["scores"], np.float64)
    assert np.abs(a).max() > 0
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())
