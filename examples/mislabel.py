"""Find mislabeled training examples with bergson, on a model and loss of your own.

We take scikit-learn's handwritten digits (shipped offline), change 10% of the training
labels to a wrong class, and train a small torch classifier on the corrupted set. Then we
rank every training example by its *self-influence* g_iᵀ H⁻¹ g_i, where g_i is the gradient
of the example's loss and H the second moment of all training gradients (the empirical
Fisher, a cheap stand-in for the curvature, damped). Mislabeled examples are hard to fit, so their
gradients are large in directions the rest of the data does not support: they rank high.

    python examples/mislabel.py
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score
from torch import nn

import bergson


def main(train_size: int | None = None, epochs: int = 200, seed: int = 0) -> dict[str, float]:
    # 1. Data: digits with 10% of the labels flipped to another class.
    rng = np.random.default_rng(seed)
    x, y = load_digits(return_X_y=True)
    order = rng.permutation(len(x))[:train_size]
    x = torch.tensor(x[order] / 16.0, dtype=torch.float32)
    y = y[order].copy()
    flipped = rng.choice(len(y), size=len(y) // 10, replace=False)
    y[flipped] = (y[flipped] + rng.integers(1, 10, size=len(flipped))) % 10
    labels = torch.tensor(y)

    # 2. Any model and any per-example loss.
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        return F.cross_entropy(model(inputs), targets, reduction="none")  # one loss per example

    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(epochs):
        optimizer.zero_grad()
        loss_fn(model, (x, labels)).mean().backward()
        optimizer.step()

    # 3. Per-example gradients of every nn.Linear layer, randomly projected to 16 x 16 per layer.
    batches = [(x[i : i + 256], labels[i : i + 256]) for i in range(0, len(x), 256)]
    grads = bergson.per_example_gradients(model, batches, loss_fn, projection_dim=16, progress=False)

    # 4. Self-influence |H^(-1/2) g|^2 with H the damped second moment of the training gradients.
    h = bergson.fit_second_moment(grads, damping=0.1)
    self_influence = (h.apply(grads.vectors, -0.5, grads.layouts) ** 2).sum(1).numpy()

    # 5. How well does the ranking find the flipped labels?
    is_flipped = np.zeros(len(y), dtype=bool)
    is_flipped[flipped] = True
    ranking = np.argsort(-self_influence)
    top = ranking[: len(y) // 10]
    result = {
        "auc": float(roc_auc_score(is_flipped, self_influence)),
        "found_in_top_10pct": float(is_flipped[top].sum() / is_flipped.sum()),
    }
    print(f"{len(flipped)} of {len(y)} labels flipped")
    print(f"ROC AUC of the self-influence ranking: {result['auc']:.3f}")
    print(f"flipped labels among the top 10% of the ranking: {result['found_in_top_10pct']:.0%}")
    return result


if __name__ == "__main__":
    main()
