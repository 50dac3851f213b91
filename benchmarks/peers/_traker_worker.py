"""TRAK scores with traker (MadryLab), run inside ``benchmarks/.venvs/traker``.

Started by ``benchmarks.peers.run`` with that venv's Python (``-I``); imports nothing from
this repository. Reads the classifier workload (``digits.npz``: standardized digits and the
trained ``Linear(64, 10)`` weights), featurizes the training set with one checkpoint and scores
the queries with traker's own image-classification output (the margin), on the CPU: traker's
``BasicProjector`` with a normal projection, since its ``fast_jl`` projector is CUDA-only.
Writes ``scores.npy`` [queries, train] (traker's orientation: positive = the training example
raises the query's margin, i.e. lowers its loss, as bergson's) and ``result.json``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from trak import TRAKer
from trak.projectors import BasicProjector, ProjectionType


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # run with python -I: no script dir on the path
    from _worker_common import LogReg, write_result  # shared by the peer workers

    p = argparse.ArgumentParser()
    p.add_argument("--workload", type=Path, required=True)
    p.add_argument("--out_dir", type=Path, required=True)
    p.add_argument("--proj_dim", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    save_dir = args.out_dir / "trak_results"
    if save_dir.exists():  # a fresh featurization every run
        shutil.rmtree(save_dir)
    start = time.perf_counter()
    w = np.load(args.workload)
    model = LogReg()
    model.fc.weight.data = torch.from_numpy(w["weight"])
    model.fc.bias.data = torch.from_numpy(w["bias"])
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    x_tr, y_tr = torch.from_numpy(w["x_train"]), torch.from_numpy(w["y_train"])
    x_q, y_q = torch.from_numpy(w["x_query"]), torch.from_numpy(w["y_query"])
    grad_dim = sum(p.numel() for p in model.parameters())
    projector = BasicProjector(
        grad_dim=grad_dim, proj_dim=args.proj_dim, seed=0, proj_type=ProjectionType.normal, device="cpu"
    )
    traker = TRAKer(
        model=model,
        task="image_classification",
        train_set_size=len(x_tr),
        save_dir=str(save_dir),
        load_from_save_dir=True,  # also what creates its experiments.json
        device="cpu",
        projector=projector,
        use_half_precision=False,
        logging_level=logging.WARNING,
    )
    traker.load_checkpoint(sd, model_id=0)
    bs = args.batch_size
    for lo in range(0, len(x_tr), bs):
        hi = min(lo + bs, len(x_tr))
        traker.featurize(batch=(x_tr[lo:hi], y_tr[lo:hi]), num_samples=hi - lo)
    traker.finalize_features()
    traker.start_scoring_checkpoint(exp_name="digits", checkpoint=sd, model_id=0, num_targets=len(x_q))
    for lo in range(0, len(x_q), bs):
        hi = min(lo + bs, len(x_q))
        traker.score(batch=(x_q[lo:hi], y_q[lo:hi]), num_samples=hi - lo)
    scores = np.asarray(traker.finalize_scores(exp_name="digits"), dtype=np.float64).T
    np.save(args.out_dir / "scores.npy", scores)
    settings = {"projector": "BasicProjector normal", "proj_dim": args.proj_dim, "checkpoints": 1}
    write_result(args.out_dir, "traker", "trak", settings, scores.shape, start)


if __name__ == "__main__":
    main()
