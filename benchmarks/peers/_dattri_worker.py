"""Attribution scores with dattri, run inside ``benchmarks/.venvs/dattri``.

Started by ``benchmarks.peers.run`` with that venv's Python (``-I``); imports nothing from
this repository. Reads the classifier workload (``digits.npz``: standardized digits and the
trained ``Linear(64, 10)`` weights) and runs one method per process, on the CPU:

* ``grad_dot``: ``TracInAttributor`` with one checkpoint of weight 1, unnormalized gradients
  of each example's cross-entropy (dattri's Grad-Dot), no projection;
* ``influence``: ``IFAttributorExplicit`` (the exact Hessian of the training loss, inverted,
  with ``regularization`` = the training weight decay);
* ``trak``: ``TRAKAttributor`` with one checkpoint, the margin log p − log(1 − p) as target
  and p as the correct-class probability, projection to ``--proj_dim``.

Writes ``scores.npy`` [queries, train] (dattri's [train, test] transposed; its orientation:
positive = the training example helps, i.e. lowers the query's loss, as bergson's) and
``result.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from dattri.task import AttributionTask
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # run with python -I: no script dir on the path
    from _worker_common import LogReg, write_result  # shared by the peer workers

    p = argparse.ArgumentParser()
    p.add_argument("--workload", type=Path, required=True)
    p.add_argument("--out_dir", type=Path, required=True)
    p.add_argument("--method", choices=["grad_dot", "influence", "trak"], required=True)
    p.add_argument("--proj_dim", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    w = np.load(args.workload)
    wd = float(w["wd"])
    model = LogReg()
    model.fc.weight.data = torch.from_numpy(w["weight"])
    model.fc.bias.data = torch.from_numpy(w["bias"])
    model.eval()
    ckpt = {k: v.clone() for k, v in model.state_dict().items()}
    train = TensorDataset(torch.from_numpy(w["x_train"]), torch.from_numpy(w["y_train"]))
    query = TensorDataset(torch.from_numpy(w["x_query"]), torch.from_numpy(w["y_query"]))
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=False)
    query_loader = DataLoader(query, batch_size=args.batch_size, shuffle=False)
    ce = nn.CrossEntropyLoss()

    def loss_func(params, data):
        # one example (per-example gradients) or a batch (the explicit Hessian): mean CE
        x, y = data
        logits = torch.func.functional_call(model, params, x.reshape(-1, x.shape[-1]))
        return ce(logits, y.reshape(-1))

    def margin_func(params, data):
        x, y = data
        logits = torch.func.functional_call(model, params, x.unsqueeze(0))
        logp = -ce(logits, y.unsqueeze(0))
        return logp - torch.log(1 - torch.exp(logp))

    def prob_func(params, data):
        x, y = data
        logits = torch.func.functional_call(model, params, x.unsqueeze(0))
        return torch.exp(-ce(logits, y.unsqueeze(0)))

    settings: dict[str, object] = {}
    if args.method == "grad_dot":
        from dattri.algorithm.tracin import TracInAttributor

        task = AttributionTask(loss_func=loss_func, model=model, checkpoints=ckpt)
        attr = TracInAttributor(
            task=task,
            weight_list=torch.ones(1),
            normalized_grad=False,
            device="cpu",
        )
        # TracIn projects to DEFAULT_PROJECTOR_KWARGS' 512 dims unless its projector settings
        # are None; the 650 parameters are few enough to keep exact gradients.
        attr.projector_kwargs = None
        settings = {
            "attributor": "TracInAttributor",
            "weight_list": [1.0],
            "normalized_grad": False,
            "projection": "none",
        }
        scores = attr.attribute(train_loader, query_loader)
    elif args.method == "influence":
        from dattri.algorithm.influence_function import IFAttributorExplicit

        task = AttributionTask(loss_func=loss_func, model=model, checkpoints=ckpt)
        attr = IFAttributorExplicit(task=task, device="cpu", regularization=wd)
        attr.cache(train_loader)
        settings = {"attributor": "IFAttributorExplicit", "regularization": wd}
        scores = attr.attribute(train_loader, query_loader)
    else:
        from dattri.algorithm.trak import TRAKAttributor

        task = AttributionTask(loss_func=margin_func, model=model, checkpoints=ckpt)
        attr = TRAKAttributor(
            task=task,
            correct_probability_func=prob_func,
            projector_kwargs={"proj_dim": args.proj_dim, "device": "cpu"},
            device="cpu",
        )
        attr.cache(train_loader)
        settings = {"attributor": "TRAKAttributor", "proj_dim": args.proj_dim, "checkpoints": 1}
        scores = attr.attribute(query_loader)
    scores_np = np.asarray(scores.detach().double().numpy()).T
    np.save(args.out_dir / "scores.npy", scores_np)
    write_result(args.out_dir, "dattri", args.method, settings, scores_np.shape, start)


if __name__ == "__main__":
    main()
