"""A build on a GPU equals the same build on the CPU: the same rows in the same order, across
several shards and several batches per shard, per-token rows too. These tests need a CUDA
device and are skipped without one; the GPU check (``bash benchmarks/gpu.sh``) runs them on a
lent GPU.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from bergson import build
from tests.helpers.stores import make_cfg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("per_token", [False, True])
def test_gpu_store_equals_cpu_store(tmp_path, model_dir, corpus_file, per_token):
    cfg = make_cfg(
        tmp_path, model_dir, corpus_file, "cpu", device="cpu", precision="fp32", save_dtype="float32",
        shard_size=7, token_batch_size=128, per_token=per_token,
    )  # fmt: skip
    cpu = build(cfg)
    gpu = build(replace(cfg, run_path=str(tmp_path / "gpu"), device="cuda"))
    np.testing.assert_array_equal(gpu.rows["row_id"], cpu.rows["row_id"])
    np.testing.assert_array_equal(gpu.rows["num_tokens"], cpu.rows["num_tokens"])
    np.testing.assert_allclose(gpu.rows["loss"], cpu.rows["loss"], rtol=1e-4)
    a, b = np.asarray(cpu.all, np.float64), np.asarray(gpu.all, np.float64)
    assert np.abs(a).sum(axis=1).min() > 0  # every compared row holds something
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())
    assert len(cpu.manifest.shards) == len(gpu.manifest.shards) > 2
