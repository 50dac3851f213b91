"""``bergson preconditioner --shard_preconditioners`` on two workers: each rank fits and saves
its own modules' blocks, and the whole equals the one-process fit."""

from __future__ import annotations

import json

import numpy as np

from bergson.config import PreconditionerConfig, options_of
from bergson.preconditioning import fit_preconditioner
from bergson.transforms.preconditioners import META_FILE, TENSORS_FILE, load_preconditioner, part_file
from tests.helpers.distributed import one_cfg


def test_sharded_fit_on_two_workers_equals_one_process(tmp_path, model_dir, corpus_file, caplog):
    base = one_cfg(tmp_path, model_dir, corpus_file, "one")
    one = fit_preconditioner(options_of(PreconditionerConfig, base, shard_preconditioners=True))
    assert "one process; nothing to shard" in caplog.text
    root = tmp_path / "sharded"
    two = fit_preconditioner(
        options_of(
            PreconditionerConfig, base, run_path=str(root), nproc_per_node=2, shard_preconditioners=True
        )
    )
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
