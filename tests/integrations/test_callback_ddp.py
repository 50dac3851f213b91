"""The Trainer callback under data parallel training (torchrun, 2 CPU processes, gloo): the
epoch stores hold every rank's rows, each equal to `bergson build` at the weights and
optimizer state of the step that trained on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from bergson.models import find_tracked_modules
from bergson.store import load_gradients
from bergson.transforms.optimizer_state import normalizers_from_optimizer_state
from tests.helpers.trainer import MODEL, _build, _close, _token_ids

ROOT = Path(__file__).resolve().parents[2]
ROWS = 10  # 2 ranks x 2 rows per step: 3 steps per epoch, the last one filled with 2 repeated rows


def test_data_parallel_training_stores_every_rank_rows(tmp_path):
    from transformers import AutoModelForCausalLM

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(ROOT / "tests" / "helpers" / "ddp_trainer.py"), str(tmp_path), str(ROWS)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    fed = [json.loads((tmp_path / f"fed-{r}.json").read_text()) for r in range(2)]
    assert len(fed[0]) == len(fed[1]) == 6  # 3 steps per epoch, 2 epochs
    ids = _token_ids(ROWS)
    model = AutoModelForCausalLM.from_pretrained(MODEL)
    for epoch in range(2):
        store = load_gradients(tmp_path / "grads" / f"epoch_{epoch}")
        order = pq.read_table(store.root / "order.parquet").to_pandas()
        plan = store.manifest.plan
        assert plan["ranks"] == 2 and plan["repeated_rows"] == 2 and plan["rows_not_trained"] == 0
        assert plan["steps"] == [3 * epoch + k for k in range(3)]
        by_row = order.groupby("row").step
        first_step = by_row.min()
        assert (by_row.max()[by_row.size() > 1] == plan["steps"][-1]).all()  # repeats fill the last step
        for k in range(3):
            step = 3 * epoch + k
            # the order file lists what both ranks were fed in that step
            at_step = order[order.step == step]
            assert sorted(at_step.row) == sorted(fed[0][step] + fed[1][step])
            # a row repeated to fill the last step keeps the vector of its first step
            rows = sorted(r for r in set(at_step.row) if first_step[r] == step)
            normalizers = None
            if step > 0:
                normalizers = normalizers_from_optimizer_state(
                    tmp_path / f"optimizer-{step}.pt", model, find_tracked_modules(model), form="rank_one"
                )
            weights = torch.load(tmp_path / f"weights-{step}.pt", weights_only=True)
            built = _build(tmp_path, f"build-{step}", weights, rows, normalizers, ids)
            _close(np.asarray(store.all[rows]), np.asarray(built.all[:]))
            np.testing.assert_allclose(store.rows["loss"][rows], built.rows["loss"], rtol=1e-4)
            np.testing.assert_array_equal(store.rows["num_tokens"][rows], built.rows["num_tokens"])
    assert proc.stderr.count("were trained on again in the last step") == 2  # rank 0, once per epoch
