"""The classifier workload: multinomial logistic regression on scikit-learn's digits.

Data: the 1,797 8x8 digits, shuffled with a seed, standardized with the training split's mean
and standard deviation; ``num_train`` training examples and ``num_query`` held-out queries.
Model: ``nn.Linear(64, 10)`` (weight and bias: 650 parameters), trained from zeros by
full-batch L-BFGS on mean cross-entropy + (wd/2)·‖θ‖², so that training is deterministic and
convex and a retrain on a subset has one answer. Queries are measured by their cross-entropy.

Ours runs on it through bergson's Python API: exact per-example gradients from
``GradientCollector`` (``projection_dim=0``, bias included) and a ``Preconditioner``:

* ``grad_dot``: g_qᵀ g_i of cross-entropy gradients;
* ``influence``: g_qᵀ (F + wd·I)⁻¹ g_i with F the empirical Fisher (mean g gᵀ over training);
* ``trak``: TRAK with one model and no projection, φ_qᵀ (ΦᵀΦ/N + δI)⁻¹ φ_i · (1 − p_i) with φ the
  gradient of the margin log p_y − log(1 − p_y), as in Park et al. (2023); δ = 10⁻³ × the
  mean eigenvalue.

Everything a worker needs is written to ``digits.npz`` (data, trained parameters, wd).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._worker_common import LogReg  # the same model as the peer workers


def make_data(num_train: int, num_query: int, seed: int) -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    if num_train + num_query > len(x):
        raise ValueError(f"--digits_train + --digits_queries must be at most {len(x)}")
    order = np.random.default_rng(seed).permutation(len(x))
    tr, q = order[:num_train], order[num_train : num_train + num_query]
    mean, std = x[tr].mean(0), x[tr].std(0) + 1e-3
    norm = ((x - mean) / std).astype(np.float32)
    return {
        "x_train": norm[tr],
        "y_train": y[tr].astype(np.int64),
        "x_query": norm[q],
        "y_query": y[q].astype(np.int64),
    }


def train(x: np.ndarray, y: np.ndarray, wd: float, max_iter: int = 500) -> LogReg:
    """Minimize mean CE + (wd/2)‖θ‖² from zeros with full-batch L-BFGS (float64 inside)."""
    torch.manual_seed(0)
    model = LogReg().double()
    for p in model.parameters():
        nn.init.zeros_(p)
    xt, yt = torch.from_numpy(x).double(), torch.from_numpy(y)
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        reg = sum((p * p).sum() for p in model.parameters())
        loss = F.cross_entropy(model(xt), yt) + 0.5 * wd * reg
        loss.backward()
        return loss

    opt.step(closure)
    return model.float()


def query_losses(model: LogReg, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
        return F.cross_entropy(logits, torch.from_numpy(y), reduction="none").double().numpy()


def retrain_losses(data: dict[str, np.ndarray], masks: np.ndarray, wd: float) -> np.ndarray:
    """[subsets, queries]: each query's loss after retraining on each subset."""
    from tqdm.auto import tqdm

    out = np.zeros((len(masks), len(data["y_query"])))
    for k, keep in enumerate(tqdm(masks, desc="digits retrains", unit="model")):
        model = train(data["x_train"][keep], data["y_train"][keep], wd)
        out[k] = query_losses(model, data["x_query"], data["y_query"])
    return out


def _per_example(model: LogReg, x: np.ndarray, y: np.ndarray, target: str) -> torch.Tensor:
    """Exact per-example gradients [n, 650] (weight row-major, then bias) of each example's
    cross-entropy (``target='loss'``) or margin (``'margin'``), through bergson's hooks."""
    from bergson import GradientCollector

    for p in model.parameters():
        p.requires_grad_(False)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    with GradientCollector(model, {"fc": model.fc}, projection_dim=0, include_bias=True) as col:
        logits = model(xt)
        logp = torch.log_softmax(logits, -1).gather(1, yt[:, None]).squeeze(1)
        if target == "loss":
            out = -logp
        else:  # log p - log(1 - p)
            out = logp - torch.log1p(-logp.exp().clamp(max=1 - 1e-7))
        out.sum().backward()
    return col.gradients["fc"].double()


def _preconditioner(vectors: torch.Tensor, damping: float, mode: str) -> torch.Tensor:
    """(VᵀV/N + δI)⁻¹ through bergson's ``Preconditioner`` (δ absolute, or relative to the
    mean eigenvalue)."""
    from bergson import Preconditioner

    second = {"fc": vectors.T @ vectors / len(vectors)}
    pre = Preconditioner(second, num_rows=len(vectors), layout={}, damping=damping, damping_mode=mode)
    return pre.matrix("fc", -1.0)


METHODS = ("grad_dot", "influence", "trak")


def ours(model: LogReg, data: dict[str, np.ndarray], wd: float, method: str) -> np.ndarray:
    """Our scores [queries, train] for one of ``METHODS``."""
    if method in ("grad_dot", "influence"):
        g_tr = _per_example(model, data["x_train"], data["y_train"], "loss")
        g_q = _per_example(model, data["x_query"], data["y_query"], "loss")
        if method == "grad_dot":
            return (g_q @ g_tr.T).numpy()
        return (g_q @ _preconditioner(g_tr, wd, "absolute") @ g_tr.T).numpy()
    if method != "trak":
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    phi_tr = _per_example(model, data["x_train"], data["y_train"], "margin")
    phi_q = _per_example(model, data["x_query"], data["y_query"], "margin")
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(data["x_train"])), -1)
        p_true = probs.gather(1, torch.from_numpy(data["y_train"])[:, None]).squeeze(1).double()
    # The margin's gradient w.r.t. the logits sums to 0, so ΦᵀΦ is singular (65 null
    # directions): a small damping relative to its mean eigenvalue keeps the inverse finite.
    inv = _preconditioner(phi_tr, 1e-3, "relative")
    return ((phi_q @ inv @ phi_tr.T) * (1 - p_true)[None]).numpy()


def load_workload(path: Path) -> tuple[LogReg, dict[str, np.ndarray], float]:
    with np.load(path) as w:
        data = {k: w[k] for k in ("x_train", "y_train", "x_query", "y_query")}
        model = LogReg()
        with torch.no_grad():
            model.fc.weight.copy_(torch.from_numpy(w["weight"]))
            model.fc.bias.copy_(torch.from_numpy(w["bias"]))
        return model, data, float(w["wd"])


def save_workload(path: Path, data: dict[str, np.ndarray], model: LogReg, wd: float) -> Path:
    arrays: dict[str, Any] = {
        **data,
        "weight": model.fc.weight.detach().numpy(),
        "bias": model.fc.bias.detach().numpy(),
        "wd": np.array(wd),
    }
    np.savez(path, **arrays)
    return path
