"""Projection matrices: deterministic, and inner-product preserving in expectation."""

from __future__ import annotations

import numpy as np
import torch

from bergson.transforms.projection import projection_matrix


def test_same_seed_and_name_give_identical_matrices():
    a = projection_matrix(7, "layers.0.mlp", "left", 8, 33)
    b = projection_matrix(7, "layers.0.mlp", "left", 8, 33, dtype=torch.float32)
    assert torch.equal(a, b)
    assert not torch.equal(a, projection_matrix(8, "layers.0.mlp", "left", 8, 33))
    assert not torch.equal(a, projection_matrix(7, "layers.1.mlp", "left", 8, 33))
    assert not torch.equal(a, projection_matrix(7, "layers.0.mlp", "right", 8, 33))
    # float64 and float32 copies are the same draw
    c = projection_matrix(7, "layers.0.mlp", "left", 8, 33, dtype=torch.float64)
    torch.testing.assert_close(c.float(), a)


def test_entries_have_variance_one_over_p():
    p, n = 16, 4096
    m = projection_matrix(0, "x", "left", p, n, dtype=torch.float64)
    # the sample variance of p*n N(0, 1/p) entries has relative std sqrt(2/(p n))
    var = float(m.var()) * p
    assert abs(var - 1) < 5 * (2 / (p * n)) ** 0.5


def test_two_sided_projection_preserves_inner_products_in_expectation():
    """E<L A R^T, L B R^T> = <A, B>: checked with a z-test over independent seeds."""
    rng = np.random.default_rng(0)
    out, n_in, p, draws = 24, 20, 6, 400
    a = torch.from_numpy(rng.standard_normal((out, n_in)))
    b = a + 0.7 * torch.from_numpy(rng.standard_normal((out, n_in)))
    truth = float((a * b).sum())
    est = []
    for s in range(draws):
        left = projection_matrix(s, "m", "left", p, out, dtype=torch.float64)
        right = projection_matrix(s, "m", "right", p, n_in, dtype=torch.float64)
        est.append(float(((left @ a @ right.T) * (left @ b @ right.T)).sum()))
    est_arr = np.asarray(est)
    se = est_arr.std(ddof=1) / np.sqrt(draws)
    assert abs(est_arr.mean() - truth) < 4 * se
    # the spread follows the Gaussian Johnson-Lindenstrauss bound: each side multiplies
    # the second moment by at most (1 + 2/p), so std / (|A| |B|) <= sqrt((1 + 2/p)^2 - rho^2)
    norms = float(a.norm() * b.norm())
    rho = truth / norms
    bound = ((1 + 2 / p) ** 2 - rho**2) ** 0.5
    assert est_arr.std() / norms < 1.15 * bound
