"""The pure helpers of ``benchmarks/peers/run.py``: agreement, LDS, the table, and the digits
workload's gradient path. No virtual environment is created and no peer runs here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.peers import digits, lm
from benchmarks.peers.metrics import Row, agreement, lds, markdown_table, random_halves


def test_agreement_of_transformed_scores() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 20))
    same = agreement(a, 2 * a + 5)  # an affine map keeps both correlations at 1
    assert same["pearson"] == pytest.approx(1.0)
    assert same["spearman"] == pytest.approx(1.0)
    assert same["spearman_per_query"] == pytest.approx(1.0)
    monotone = agreement(a, np.exp(3 * a))  # ranks kept, values bent
    assert monotone["spearman"] == pytest.approx(1.0)
    assert monotone["pearson"] < 0.9
    flipped = agreement(a, -a)
    assert flipped["spearman"] == pytest.approx(-1.0)
    assert flipped["pearson"] == pytest.approx(-1.0)


def test_agreement_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        agreement(np.zeros((2, 3)), np.zeros((3, 2)))


def test_lds_hand_computed() -> None:
    # 4 training examples, one query, 3 retrains on the halves {0,1}, {1,2}, {2,3}.
    scores = np.array([[1.0, 2.0, 3.0, 4.0]])
    masks = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], bool)
    # predicted sums 3, 5, 7 (ranks 0, 1, 2); negated losses -0.3, -0.1, -0.2 (ranks 0, 2, 1):
    # Spearman = 1 - 6 * (0 + 1 + 1) / (3 * (9 - 1)) = 0.5
    losses = np.array([[0.3], [0.1], [0.2]])
    got = lds(scores, masks, losses)
    assert got["spearman"] == pytest.approx(0.5)
    assert got["queries"] == 1


def test_lds_of_an_exact_linear_datamodel() -> None:
    rng = np.random.default_rng(1)
    true = rng.normal(size=(4, 30))  # positive = lowers the query's loss
    masks = random_halves(30, 12, seed=3)
    losses = 2.0 - masks.astype(float) @ true.T  # [subsets, queries]
    assert lds(true, masks, losses)["spearman"] == pytest.approx(1.0)
    assert lds(true, masks, losses)["pearson"] == pytest.approx(1.0)
    assert lds(-true, masks, losses)["spearman"] == pytest.approx(-1.0)
    noisy = lds(true + rng.normal(scale=3.0, size=true.shape), masks, losses)["spearman"]
    assert noisy < 0.99


def test_lds_skips_constant_queries_and_checks_shapes() -> None:
    masks = random_halves(6, 4, seed=0)
    scores = np.arange(12.0).reshape(2, 6)
    losses = np.stack([np.ones(4), -(masks.astype(float) @ scores[1])], axis=1)
    got = lds(scores, masks, losses)
    assert got["queries"] == 1  # the first query's loss never moves
    assert got["spearman"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\[subsets, queries\]"):
        lds(scores, masks, losses.T)


def test_random_halves() -> None:
    masks = random_halves(11, 5, seed=7)
    assert masks.shape == (5, 11)
    assert (masks.sum(1) == 5).all()
    assert (masks == random_halves(11, 5, seed=7)).all()
    assert not (masks == random_halves(11, 5, seed=8)).all()
    with pytest.raises(ValueError):
        random_halves(10, 1, seed=0)


def test_markdown_table() -> None:
    rows = [
        Row("ours", "digits", "grad_dot", wall_s=1.234, peak_rss_mb=300.4, lds={"spearman": 0.71234}),
        Row(
            "dattri",
            "digits",
            "grad_dot",
            wall_s=2.0,
            peak_rss_mb=400.0,
            agreement={"spearman": 0.99951, "pearson": math.nan},
        ),
        Row("traker", "lm", "trak", reason="cannot | run"),
    ]
    lines = markdown_table(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert all(len(c) == len(cells[0]) for c in cells)
    assert cells[2][:5] == ["ours", "digits", "grad_dot", "1.2", "300"]
    assert cells[2][7] == "0.712"
    assert cells[3][5:7] == ["1.000", "–"]  # NaN shows as a dash
    assert cells[4][3] == "–" and cells[4][-1] == "cannot / run"


def test_dot_scores_use_common_modules() -> None:
    train = {
        "a": np.array([[1.0, 0.0], [0.0, 2.0]]),
        "b": np.array([[1.0], [1.0]]),
        "only_train": np.ones((2, 1)),
    }
    queries = {"a": np.array([[3.0, 1.0]]), "b": np.array([[-1.0]])}
    scores, common = lm.dot_scores(train, queries)
    assert common == ["a", "b"]
    np.testing.assert_allclose(scores, [[3.0 - 1.0, 2.0 - 1.0]])
    with pytest.raises(ValueError, match="no module"):
        lm.dot_scores({"x": np.ones((1, 1))}, {"y": np.ones((1, 1))})


def test_digits_gradients_and_training_against_autograd() -> None:
    data = digits.make_data(40, 5, seed=0)
    model = digits.train(data["x_train"], data["y_train"], wd=0.1)
    # the L-BFGS solution is a stationary point of mean CE + (wd/2)||theta||^2
    m64 = digits.LogReg().double()
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    x, y = torch.from_numpy(data["x_train"]).double(), torch.from_numpy(data["y_train"])
    objective = F.cross_entropy(m64(x), y) + 0.05 * sum((p * p).sum() for p in m64.parameters())
    grads = torch.autograd.grad(objective, list(m64.parameters()))
    assert max(float(g.abs().max()) for g in grads) < 1e-4
    # bergson's per-example gradients (weight row-major, then bias) against one autograd call each
    got = digits._per_example(model, data["x_query"], data["y_query"], "loss")
    want_q = autograd_grads(model, data["x_query"], data["y_query"])
    torch.testing.assert_close(got, want_q, rtol=1e-4, atol=1e-6)
    want_tr = autograd_grads(model, data["x_train"], data["y_train"])
    scores = digits.ours(model, data, 0.1, "grad_dot")  # [queries, train]
    np.testing.assert_allclose(scores, (want_q @ want_tr.T).numpy(), rtol=1e-4, atol=1e-6)


def autograd_grads(model: digits.LogReg, x: np.ndarray, y: np.ndarray) -> torch.Tensor:
    rows = []
    for i in range(len(x)):
        ref = digits.LogReg()
        ref.load_state_dict(model.state_dict())
        F.cross_entropy(ref(torch.from_numpy(x[i : i + 1])), torch.from_numpy(y[i : i + 1])).backward()
        assert ref.fc.weight.grad is not None and ref.fc.bias.grad is not None
        rows.append(torch.cat([ref.fc.weight.grad.flatten(), ref.fc.bias.grad]).double())
    return torch.stack(rows)


@pytest.mark.parametrize(
    ("change", "option"),
    [
        ({"peers": ["bergson", "nope"]}, "--peers"),
        ({"digits_train": 1790}, "--digits_train"),
        ({"lds_subsets": 1}, "--lds_subsets"),
        ({"wd": 0.0}, "--wd"),
        ({"num_docs": 0}, "--num_docs"),
    ],
)
def test_run_rejects_bad_options_by_name(change: dict, option: str) -> None:
    import argparse

    from benchmarks.peers.run import PEERS, check_args

    good = {"peers": list(PEERS), "num_docs": 8, "digits_train": 100, "digits_queries": 10, "lds_subsets": 4}
    check_args(argparse.Namespace(**good, wd=0.01))
    with pytest.raises(SystemExit, match=option):
        check_args(argparse.Namespace(**{**good, "wd": 0.01, **change}))
