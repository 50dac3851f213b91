"""SOURCE against exact unrolled differentiation, against EK-FAC in its limit, and end to end."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from bergson.cli import main
from bergson.config import DataConfig, EkfacConfig, SourceConfig
from bergson.errors import BergsonError
from bergson.methods.source import (
    Curvature,
    plan,
    stage_schedule,
    step_functions,
    trainer_segments,
    unroll_segment,
    unrolled_queries,
)
from bergson.store import load_gradients
from bergson.transforms.ekfac import Factors

# ---------------------------------------------------------------------- the maths, exactly


def _kronecker_identity(a: torch.Tensor, out: int) -> tuple[Factors, dict[str, torch.Tensor]]:
    """The eigenbasis and eigenvalues of I_out ⊗ a (the Hessian of a linear layer's squared error,
    row-major vec), exactly."""
    lam, vecs = torch.linalg.eigh(a)
    eigen = Factors(
        {
            "w": {
                "S_eigenvectors": torch.eye(out, dtype=torch.float64),
                "S_eigenvalues": torch.ones(out, dtype=torch.float64),
                "A_eigenvectors": vecs,
                "A_eigenvalues": lam,
            }
        }
    )
    return eigen, {"w": torch.outer(torch.ones(out, dtype=torch.float64), lam)}


def _scores(products: list[dict[str, torch.Tensor]], grads: list[torch.Tensor]) -> torch.Tensor:
    """Σ_l ⟨P_l, G_{m,l}⟩ for every document m: [N, nq]."""
    return sum(torch.einsum("qoi,moi->mq", p["w"], g) for p, g in zip(products, grads))  # type: ignore[return-value]


def _through_steps(x, y, xq, yq, w0, steps):
    """Linear regression (MSE) trained by ``steps`` (one ``step(w, grad, k)`` -> next w per step):
    autograd's −d(query loss)/d(example weight) [N, 2], each step's starting w and the final w."""
    eps = torch.zeros(len(x), dtype=torch.float64, requires_grad=True)
    w, starts = w0.clone().requires_grad_(True), []
    for k, step in enumerate(steps):
        starts.append(w.detach().clone())
        losses = 0.5 * ((x @ w.T - y) ** 2).sum(1)
        (grad,) = torch.autograd.grad(losses.mean() + (eps * losses).sum(), w, create_graph=True)
        w = step(w, grad, k)
    truth = [
        -torch.autograd.grad(0.5 * ((w @ xq[i] - yq[i]) ** 2).sum(), eps, retain_graph=True)[0]
        for i in range(2)
    ]
    return torch.stack(truth, 1), starts, w.detach()


def test_one_segment_per_step_equals_autograd_through_gradient_descent():
    """Linear regression by full-batch GD with varying learning rates: the Hessian is exactly
    I ⊗ (Σ x xᵀ / N) at every step, so one segment per step (the document's gradient at the step's
    start, discrete unroll) is the exact derivative of the query loss w.r.t. each example's weight."""
    torch.manual_seed(0)
    n, d_in, d_out, lrs = 7, 4, 3, [0.3, 0.1, 0.5, 0.2, 0.4, 0.25]
    x, y = torch.randn(n, d_in, dtype=torch.float64), torch.randn(n, d_out, dtype=torch.float64)
    xq, yq = torch.randn(2, d_in, dtype=torch.float64), torch.randn(2, d_out, dtype=torch.float64)
    w0 = torch.randn(d_out, d_in, dtype=torch.float64)
    steps = [lambda w, g, k, eta=eta: w - eta * g for eta in lrs]
    truth, starts, w_final = _through_steps(x, y, xq, yq, w0, steps)
    eigen, values = _kronecker_identity(x.T @ x / n, d_out)
    query = {"w": torch.einsum("qo,qi->qoi", xq @ w_final.T - yq, xq)}
    segments = [Curvature(eigen, values, [eta]) for eta in lrs]
    products = unrolled_queries(query, segments, damping=0.0, damping_mode="absolute", unroll="discrete")
    grads = [torch.einsum("mo,mi->moi", x @ s.T - y, x) for s in starts]
    ours = _scores(products, grads)
    assert truth.abs().max() > 1e-2  # not trivially zero
    torch.testing.assert_close(ours, truth, rtol=1e-10, atol=1e-12)


def _two_stages(seed: int, beta: float) -> tuple:
    """Two stages of quadratic curvature I ⊗ A_s and documents whose losses are linear (constant
    gradients c_m), stepped by gradient descent with a momentum buffer ν ← β ν + ∇J (β = 0: plain
    descent): (A, c, the stages' rates, the query gradient at the end, autograd's -d(query)/d(weight))."""
    torch.manual_seed(seed)
    n, d_in, d_out = 5, 3, 2
    mats = [torch.randn(d_in, d_in, dtype=torch.float64) for _ in range(2)]
    a = [m @ m.T / d_in + 0.1 * torch.eye(d_in, dtype=torch.float64) for m in mats]
    c = torch.randn(n, d_out, d_in, dtype=torch.float64)
    schedule = [[0.2, 0.35, 0.1], [0.05, 0.4]]
    w0 = torch.randn(d_out, d_in, dtype=torch.float64)
    xq, yq = torch.randn(d_in, dtype=torch.float64), torch.randn(d_out, dtype=torch.float64)
    eps = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    w = w0.clone().requires_grad_(True)
    nu = torch.zeros_like(w)
    for stage, lrs in enumerate(schedule):
        for eta in lrs:
            obj = (
                0.5 * torch.trace(w @ a[stage] @ w.T)
                + (c * w).sum((1, 2)).mean()
                + (eps * (c * w).sum((1, 2))).sum()
            )
            (grad,) = torch.autograd.grad(obj, w, create_graph=True)
            nu = beta * nu + grad
            w = w - eta * nu
    truth = -torch.autograd.grad(0.5 * ((w @ xq - yq) ** 2).sum(), eps)[0]
    query = {"w": torch.outer(w.detach() @ xq - yq, xq)[None]}
    return a, c, schedule, query, truth


def test_multi_step_segments_are_exact_when_curvature_and_gradients_are_constant():
    """Two stages with different quadratic curvatures (I ⊗ A_1, then I ⊗ A_2) and documents whose
    losses are linear (constant gradients): several steps per segment at varying rates, discrete
    unroll, equal autograd through the steps; exp tends to discrete as the steps shrink."""
    a, c, schedule, query, truth = _two_stages(seed=1, beta=0.0)
    d_out = c.shape[1]
    segments = [Curvature(*_kronecker_identity(a[s], d_out), lrs) for s, lrs in enumerate(schedule)]
    products = unrolled_queries(query, segments, damping=0.0, damping_mode="absolute", unroll="discrete")
    ours = _scores(products, [c, c])[:, 0]
    torch.testing.assert_close(ours, truth, rtol=1e-10, atol=1e-12)
    # the same with (eigen, eigenvalues, lrs) tuples and the eigenvalues as a corrected-stage Factors
    curvatures = [_kronecker_identity(a[s], d_out) for s in range(2)]
    tuples = [(e, Factors({"w": {"eigenvalues": v["w"]}}), lrs) for (e, v), lrs in zip(curvatures, schedule)]
    again = unrolled_queries(query, tuples, damping=0.0, damping_mode="absolute", unroll="discrete")
    torch.testing.assert_close(_scores(again, [c, c])[:, 0], ours, rtol=0, atol=0)
    # the exp form is not exact here ...
    approx = _scores(unrolled_queries(query, segments, 0.0, "absolute", "exp"), [c, c])[:, 0]
    assert (approx - truth).abs().max() > 1e-4
    # ... but tends to the discrete one as the same total rate is spread over many small steps
    lam = torch.tensor([0.0, 0.3, 2.0, 7.0], dtype=torch.float64)
    s_exp, r_exp = step_functions(lam, [0.5], "exp")
    for k, tol in ((10, 0.5), (1000, 5e-3)):
        s_dis, r_dis = step_functions(lam, [0.5 / k] * k, "discrete")
        assert (s_dis - s_exp).abs().max() < tol * 0.25 and (r_dis - r_exp).abs().max() < tol * 0.25
    torch.testing.assert_close(r_exp[0], torch.tensor(0.5, dtype=torch.float64))  # r -> Σ η at λ = 0


@pytest.mark.parametrize("varying", [False, True], ids=["one_D", "D_per_step"])
def test_adam_with_a_frozen_preconditioner_equals_autograd(varying):
    """Linear regression (bias-free, MSE) stepped by θ_{k+1} = θ_k - η_k (D_k ⊙ ∇J) with a positive
    rank-one D_k = d_k e_kᵀ, one segment per step, discrete unroll: C H C = diag(d) ⊗ (√e A √e)
    exactly, so with its exact eigenbases the scores equal autograd through the steps (with D changing
    from step to step: the cotangent's conversion at the segments' boundaries)."""
    torch.manual_seed(3)
    n, d_in, d_out, lrs = 6, 4, 3, [0.3, 0.1, 0.45, 0.2]
    x, y = torch.randn(n, d_in, dtype=torch.float64), torch.randn(n, d_out, dtype=torch.float64)
    xq, yq = torch.randn(2, d_in, dtype=torch.float64), torch.randn(2, d_out, dtype=torch.float64)
    w0 = torch.randn(d_out, d_in, dtype=torch.float64)
    steps = len(lrs) if varying else 1
    ds = [0.3 + 1.5 * torch.rand(d_out, dtype=torch.float64) for _ in range(steps)]
    es = [0.2 + 2.0 * torch.rand(d_in, dtype=torch.float64) for _ in range(steps)]
    ds, es = ds * (len(lrs) // steps), es * (len(lrs) // steps)

    rules = [
        lambda w, g, k, eta=eta, d=d, e=e: w - eta * torch.outer(d, e) * g for eta, d, e in zip(lrs, ds, es)
    ]
    truth, starts, wf = _through_steps(x, y, xq, yq, w0, rules)
    a = x.T @ x / n
    segments = []
    for eta, d, e in zip(lrs, ds, es):
        mu, vecs = torch.linalg.eigh(e.sqrt()[:, None] * a * e.sqrt()[None])
        eigen = Factors(
            {"w": {"S_eigenvectors": torch.eye(d_out, dtype=torch.float64), "A_eigenvectors": vecs}}
        )
        segments.append(Curvature(eigen, {"w": torch.outer(d, mu)}, [eta], {"w": (d.sqrt(), e.sqrt())}))
    query = {"w": torch.einsum("qo,qi->qoi", xq @ wf.T - yq, xq)}
    products = unrolled_queries(query, segments, damping=0.0, damping_mode="absolute", unroll="discrete")
    grads = [torch.einsum("mo,mi->moi", x @ s.T - y, x) for s in starts]
    ours = _scores(products, grads)
    assert truth.abs().max() > 1e-2
    torch.testing.assert_close(ours, truth, rtol=1e-10, atol=1e-12)
    # a dense C gives the same; plain gradient descent's curvature with these steps does not
    dense = [
        replace(c, preconditioner={"w": torch.outer(d.sqrt(), e.sqrt())}) for c, d, e in zip(segments, ds, es)
    ]
    torch.testing.assert_close(
        _scores(unrolled_queries(query, dense, 0.0, "absolute", "discrete"), grads), truth
    )
    plain = [replace(c, preconditioner=None) for c in segments]
    assert (
        _scores(unrolled_queries(query, plain, 0.0, "absolute", "discrete"), grads) - truth
    ).abs().max() > 1e-3
    with pytest.raises(BergsonError, match="positive"):
        unrolled_queries(query, [replace(segments[0], preconditioner={"w": torch.zeros(d_out, d_in)})])


@pytest.mark.parametrize(
    "decoupled,uniform_in", [(True, False), (False, True), (None, True)], ids=["adamw", "adam_l2", "sgd"]
)
def test_weight_decay_equals_autograd(decoupled, uniform_in):
    """Weight decay wd with a frozen rank-one D = d eᵀ, one segment per step (discrete unroll), against
    autograd through the steps: AdamW's θ -= η (wd θ + D ∇J), Adam's L2 θ -= η D (∇J + wd θ) (exact when
    e is uniform, so that wd D is diagonal in the segment's eigenbasis) and plain gradient descent on
    J + wd/2 |θ|² (no D). A per-module [out, in] decay tensor equals the number."""
    torch.manual_seed(4)
    n, d_in, d_out, lrs, wd = 6, 4, 3, [0.3, 0.1, 0.45, 0.2], 0.7
    x, y = torch.randn(n, d_in, dtype=torch.float64), torch.randn(n, d_out, dtype=torch.float64)
    xq, yq = torch.randn(2, d_in, dtype=torch.float64), torch.randn(2, d_out, dtype=torch.float64)
    w0 = torch.randn(d_out, d_in, dtype=torch.float64)
    adam = decoupled is not None
    d = 0.3 + 1.5 * torch.rand(d_out, dtype=torch.float64) if adam else torch.ones(d_out, dtype=torch.float64)
    e = torch.full((d_in,), 0.8 if adam else 1.0, dtype=torch.float64)
    if not uniform_in:
        e = 0.2 + 2 * torch.rand(d_in, dtype=torch.float64)
    dmat = torch.outer(d, e)

    def step(w: torch.Tensor, g: torch.Tensor, k: int) -> torch.Tensor:
        eta = lrs[k]
        return w - eta * wd * w - eta * dmat * g if decoupled else w - eta * dmat * (g + wd * w)

    truth, starts, wf = _through_steps(x, y, xq, yq, w0, [step] * len(lrs))
    mu, vecs = torch.linalg.eigh(e.sqrt()[:, None] * (x.T @ x / n) * e.sqrt()[None])
    eigen = Factors({"w": {"S_eigenvectors": torch.eye(d_out, dtype=torch.float64), "A_eigenvectors": vecs}})
    pre = {"w": (d.sqrt(), e.sqrt())} if adam else None
    segments = [
        Curvature(eigen, {"w": torch.outer(d, mu)}, [eta], pre, wd, decoupled_weight_decay=bool(decoupled))
        for eta in lrs
    ]
    query = {"w": torch.einsum("qo,qi->qoi", xq @ wf.T - yq, xq)}
    grads = [torch.einsum("mo,mi->moi", x @ s.T - y, x) for s in starts]
    ours = _scores(unrolled_queries(query, segments, 0.0, "absolute", "discrete"), grads)
    assert truth.abs().max() > 1e-2
    torch.testing.assert_close(ours, truth, rtol=1e-10, atol=1e-12)
    tensor = [replace(c, weight_decay={"w": torch.full((d_out, d_in), wd)}) for c in segments]
    torch.testing.assert_close(
        _scores(unrolled_queries(query, tensor, 0.0, "absolute", "discrete"), grads), ours
    )
    undecayed = [replace(c, weight_decay=0.0) for c in segments]
    assert (
        _scores(unrolled_queries(query, undecayed, 0.0, "absolute", "discrete"), grads) - truth
    ).abs().max() > 1e-3
    with pytest.raises(BergsonError, match="weight decay"):
        unrolled_queries(query, [replace(segments[0], weight_decay=-1.0)])


@pytest.mark.parametrize(
    "form", ["sgd_momentum", "adam_first_moment", "adamw", "adam_l2", "sgd_coupled_decay"]
)
def test_momentum_equals_autograd(form):
    """Steps that follow a momentum buffer ν ← β ν + a ∇J, θ -= η D ν (SGD's momentum: a = 1, D = 1;
    Adam's first moment: a = 1 - β with a frozen rank-one D, bias correction folded into η; with
    decoupled decay beside the buffer or coupled decay inside it), one segment per step, discrete
    unroll: the parameters' and the buffer's cotangents carried across the segments give autograd's
    derivative exactly. Dropping the momentum does not."""
    torch.manual_seed(5)
    n, d_in, d_out, wd = 6, 4, 3, 0.4
    lrs = [0.3, 0.1, 0.45, 0.2, 0.35, 0.15]
    x, y = torch.randn(n, d_in, dtype=torch.float64), torch.randn(n, d_out, dtype=torch.float64)
    xq, yq = torch.randn(2, d_in, dtype=torch.float64), torch.randn(2, d_out, dtype=torch.float64)
    w0 = torch.randn(d_out, d_in, dtype=torch.float64)
    adam = form.startswith("adam")
    beta, gain = (0.8, 0.2) if adam else (0.7, 1.0)
    if adam:  # Adam's bias correction of the first moment is a per-step factor on the rate
        lrs = [eta / (1 - beta ** (k + 1)) for k, eta in enumerate(lrs)]
    decay = {"adamw": "out", "adam_l2": "in", "sgd_coupled_decay": "in"}.get(form)
    d = 0.3 + 1.5 * torch.rand(d_out, dtype=torch.float64) if adam else torch.ones(d_out, dtype=torch.float64)
    e = torch.full((d_in,), 0.8, dtype=torch.float64) if adam else torch.ones(d_in, dtype=torch.float64)
    dmat = torch.outer(d, e)
    buffer: list[torch.Tensor] = []

    def step(w: torch.Tensor, g: torch.Tensor, k: int) -> torch.Tensor:
        if k == 0:
            buffer[:] = [torch.zeros_like(w)]
        g = g + wd * w if decay == "in" else g
        buffer[0] = beta * buffer[0] + gain * g
        out = w - lrs[k] * dmat * buffer[0]
        return out - lrs[k] * wd * w if decay == "out" else out

    truth, starts, wf = _through_steps(x, y, xq, yq, w0, [step] * len(lrs))
    mu, vecs = torch.linalg.eigh(e.sqrt()[:, None] * (x.T @ x / n) * e.sqrt()[None])
    eigen = Factors({"w": {"S_eigenvectors": torch.eye(d_out, dtype=torch.float64), "A_eigenvectors": vecs}})
    pre = {"w": (d.sqrt(), e.sqrt())} if adam else None
    segments = [
        Curvature(
            eigen, {"w": torch.outer(d, mu)}, [eta], pre, wd if decay else 0.0, decay == "out", beta, gain
        )
        for eta in lrs
    ]
    query = {"w": torch.einsum("qo,qi->qoi", xq @ wf.T - yq, xq)}
    grads = [torch.einsum("mo,mi->moi", x @ s.T - y, x) for s in starts]
    ours = _scores(unrolled_queries(query, segments, 0.0, "absolute", "discrete"), grads)
    assert truth.abs().max() > 1e-2
    torch.testing.assert_close(ours, truth, rtol=1e-10, atol=1e-12)
    without = [replace(c, momentum=0.0, momentum_gain=1.0) for c in segments]
    assert (
        _scores(unrolled_queries(query, without, 0.0, "absolute", "discrete"), grads) - truth
    ).abs().max() > 1e-3
    with pytest.raises(BergsonError, match="discrete unroll only"):
        unrolled_queries(query, segments, 0.0, "absolute", "exp")
    with pytest.raises(BergsonError, match=r"momentum must be in \[0, 1\)"):
        unrolled_queries(query, [replace(segments[0], momentum=1.0)], 0.0, "absolute", "discrete")


def test_momentum_over_multi_step_segments_is_exact_with_constant_curvature_and_gradients():
    """Two stages of quadratic curvature and linear document losses (the assumption SOURCE makes, made
    true), SGD with momentum over several steps per segment: exact; with zero momentum the segments
    reduce to the closed form of the momentum-free unroll."""
    beta = 0.6
    a, c, schedule, query, truth = _two_stages(seed=6, beta=beta)
    d_out, d_in = c.shape[1:]
    segments = [
        Curvature(*_kronecker_identity(a[s], d_out), lrs, momentum=beta) for s, lrs in enumerate(schedule)
    ]
    ours = _scores(unrolled_queries(query, segments, 0.0, "absolute", "discrete"), [c, c])[:, 0]
    torch.testing.assert_close(ours, truth, rtol=1e-10, atol=1e-12)
    # β = 0 through the momentum path equals the closed form (s, r) of the plain unroll
    plain = [replace(seg, momentum=0.0) for seg in segments]
    for seg in plain:
        closed, handed, none = unroll_segment(query, seg, 0.0, "absolute", "discrete")
        stepped, handed2, zero = unroll_segment(
            query, seg, 0.0, "absolute", "discrete", momentum_queries={"w": torch.zeros(1, d_out, d_in)}
        )
        assert none is None
        torch.testing.assert_close(stepped["w"], closed["w"], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(handed2["w"], handed["w"], rtol=1e-12, atol=1e-14)
        assert zero is not None and zero["w"].abs().max() == 0


# ---------------------------------------------------------------------- trainer directories


def _state(steps_lrs: dict[int, float], global_step: int, **extra) -> str:
    history = [{"step": s, "learning_rate": lr, "loss": 1.0} for s, lr in steps_lrs.items()]
    return json.dumps({"log_history": [*history, {"step": global_step, "train_runtime": 1.0}],
                       "global_step": global_step, "max_steps": global_step, **extra})  # fmt: skip


def test_trainer_directories_give_the_hand_computed_segments(tmp_path):
    first, second = tmp_path / "pretrain", tmp_path / "finetune"
    for d, steps in ((first, (2, 4)), (second, (1,))):
        for s in steps:
            (d / f"checkpoint-{s}").mkdir(parents=True)
    # stage 1: rates logged at steps 1, 3 and 4 (each unlogged step takes the next logged rate);
    # the newest checkpoint's state is read (no top-level one)
    (first / "checkpoint-4" / "trainer_state.json").write_text(_state({1: 0.1, 3: 0.05, 4: 0.02}, 4))
    (first / "checkpoint-2" / "trainer_state.json").write_text(_state({1: 9.0}, 2))  # older: not read
    # stage 2: one checkpoint at step 1 of 3, a top-level state naming the optimizer
    (second / "trainer_state.json").write_text(_state({2: 0.01}, 3, optimizer="adamw_torch"))
    segments, stages = trainer_segments([str(first), str(second)])
    # checkpoint-2 stands for steps 1..3 (step 3's middle, 2.5, is nearer 2 than 4), checkpoint-4 for step 4
    assert [s.lrs for s in segments] == [[0.1, 0.05, 0.05], [0.02], [0.01, 0.01, 0.01]]
    assert [s.first_step for s in segments] == [1, 4, 5]
    assert [s.record()["learning_rate_sum"] for s in segments] == pytest.approx([0.2, 0.02, 0.03])
    assert [s.record()["checkpoint_step"] for s in segments] == [2, 4, 5]
    assert stages[0]["logged_learning_rates"] == 3 and stages[1]["optimizer"] == "adamw_torch"
    _, lrs, notes = stage_schedule(second)
    assert notes["final_step"] == 3 and lrs == [0.01] * 3
    # without an optimizer named in the state, the newest checkpoint's optimizer.pt tells
    assert "optimizer" not in stages[0]
    param = torch.nn.Parameter(torch.zeros(2))
    for opt, expected in ((torch.optim.AdamW([param], lr=0.1), "adam (from optimizer.pt: betas (0.9, 0.999))"),
                          (torch.optim.SGD([param], lr=0.1, momentum=0.9), "sgd (from optimizer.pt: momentum 0.9)"),
                          (torch.optim.SGD([param], lr=0.1), "sgd (from optimizer.pt)")):  # fmt: skip
        torch.save(opt.state_dict(), first / "checkpoint-4" / "optimizer.pt")
        assert stage_schedule(first)[2]["optimizer"] == expected
    (first / "checkpoint-4" / "optimizer.pt").write_bytes(b"not a torch file")
    assert "optimizer" not in stage_schedule(first)[2]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            dict(models=["a", "b"], segment_steps=[1], segment_learning_rates=[0.1, 0.1]),
            "--segment_steps: 1 values",
        ),
        (
            dict(models=["a"], segment_steps=[1], segment_learning_rates=[-0.1]),
            "--segment_learning_rates -0.1",
        ),
        (dict(models=["a"], segment_steps=[-1], segment_learning_rates=[0.1]), "--segment_steps -1"),
        (dict(models=["a"]), "--models needs --segment_steps and --segment_learning_rates"),
        (dict(segments=["x"], models=["a"]), "--segments with --models"),
        (
            dict(model="a", models=["a"], segment_steps=[1], segment_learning_rates=[1.0]),
            "--model and --models",
        ),
        (dict(), "--models (or --model) or --segments is required"),
        (dict(segments=["MISSING"]), "no such directory"),
        (dict(segments=["EMPTY"]), "no checkpoint-N/"),
        (dict(segments=["NOSTATE"]), "no trainer_state.json"),
        (dict(segments=["NOLR"]), "logs no learning rate"),
    ],
)
def test_bad_segments_are_refused_naming_the_option(tmp_path, options, message):
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "NOSTATE" / "checkpoint-1").mkdir(parents=True)
    (tmp_path / "NOLR" / "checkpoint-1").mkdir(parents=True)
    (tmp_path / "NOLR" / "trainer_state.json").write_text(
        json.dumps({"log_history": [{"step": 1, "loss": 2.0}]})
    )
    if "segments" in options:
        options = {**options, "segments": [str(tmp_path / s) for s in options["segments"]]}
    with pytest.raises(BergsonError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan(SourceConfig(run_path=str(tmp_path / "run"), **options))
    with pytest.raises(BergsonError, match="--unroll"):
        step_functions(torch.ones(2), [0.1], "euler")


# ---------------------------------------------------------------------- end to end on a tiny LM


@pytest.fixture(scope="module")
def lm(tmp_path_factory, model_dir, corpus_file):
    """Two checkpoints of a tiny GPT-NeoX in a Trainer output directory, and the data options."""
    from benchmarks.common import random_neox_dir

    root = tmp_path_factory.mktemp("source")
    trainer = root / "trainer"
    for step, seed in ((2, 1), (4, 2)):
        random_neox_dir(trainer / f"checkpoint-{step}", hidden=32, layers=2, heads=2, intermediate=64,
                        max_positions=512, seed=seed)  # fmt: skip
    (trainer / "trainer_state.json").write_text(_state({1: 0.1, 3: 0.05, 4: 0.02}, 4))
    adam = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    torch.save(adam.state_dict(), trainer / "checkpoint-4" / "optimizer.pt")
    data = DataConfig(dataset=str(corpus_file), split="train[:6]", truncation=True, max_length=16)
    query = DataConfig(dataset=str(corpus_file), split="train[6:8]", truncation=True, max_length=16)
    common = dict(
        data=data, query=query, device="cpu", precision="fp32", factor_dtype="float64", token_batch_size=64
    )
    return root, trainer, common


def _values(store) -> np.ndarray:
    return np.asarray(store["scores"], np.float64)


def test_one_long_segment_equals_ekfac(lm, model_dir):
    from bergson.methods.ekfac import ekfac
    from bergson.methods.source import source

    root, _, common = lm
    ours = source(SourceConfig(run_path=str(root / "long"), models=[str(model_dir)], segment_steps=[1],
                               segment_learning_rates=[1e15], curvature_scale=1.0, **common))  # fmt: skip
    theirs = ekfac(EkfacConfig(run_path=str(root / "ekfac"), model=str(model_dir), **common))
    a, b = _values(ours), _values(theirs)
    assert np.abs(b).max() > 0
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(b).max())
    assert ours.manifest.score["orientation"] == theirs.manifest.score["orientation"]


def test_trainer_run_equals_the_explicit_call_resumes_and_sums_its_tokens(lm, caplog):
    from bergson.methods.source import source

    root, trainer, common = lm
    data, query = common["data"], common["query"]
    run = root / "cli"
    args = ["source", str(run), "--segments", str(trainer), "--dataset", data.dataset, "--split", data.split,
            "--truncation", "--max_length", "16", "--query.dataset", query.dataset, "--query.split", query.split,
            "--query.truncation", "--query.max_length", "16", "--device", "cpu", "--precision", "fp32",
            "--factor_dtype", "float64", "--token_batch_size", "64", "--per_token", "--top_k", "0"]  # fmt: skip
    main(args)
    cli = load_gradients(run / "scores")
    # the explicit call: checkpoint-2 for 3 steps (rates 0.1, 0.05, 0.05), checkpoint-4 for 1 (0.02);
    # the exp form depends on each segment's rate sum only
    models = [str(trainer / "checkpoint-2"), str(trainer / "checkpoint-4")]
    explicit = source(SourceConfig(run_path=str(root / "explicit"), models=models, segment_steps=[3, 1],
                                   segment_learning_rates=[0.2 / 3, 0.02], **common))  # fmt: skip
    np.testing.assert_allclose(_values(cli), _values(explicit), rtol=1e-6, atol=1e-9)
    score = cli.manifest.score
    assert [s["learning_rate_sum"] for s in score["segments"]] == pytest.approx([0.2, 0.02])
    assert score["unroll"] == "exp" and score["query_model"] == models[1]
    # the run's optimizer (from checkpoint-4/optimizer.pt) was Adam: announced and recorded
    assert "adam" in score["stages"][0]["optimizer"] and "adam" in score["optimizer_note"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("optimizer was adam" in m and "--step_model adam" in m for m in warnings)
    assert score["step_model"] == "sgd" and "preconditioner" not in score
    assert any("momentum is modelled with --unroll discrete only" in m for m in warnings)
    assert score["segments"][0]["momentum"]["modelled"] is False
    loss_tokens = np.asarray(cli.rows["num_tokens"]) - 1  # plain text: every token but the first
    assert score["curvature_scale"] == pytest.approx(len(loss_tokens) / loss_tokens.sum())
    # the segments differ, and both count
    seg = [_values(load_gradients(run / f"segment_{i}" / "scores")) for i in range(2)]
    assert np.abs(seg[0]).max() > 0 and np.abs(seg[1]).max() > 0
    np.testing.assert_allclose(seg[0] + seg[1], _values(cli), rtol=1e-5, atol=1e-7 * np.abs(seg[0]).max())
    # token rows sum to the document's score
    for i in range(len(cli)):
        np.testing.assert_allclose(cli.token_rows(i).sum(0), _values(cli)[i], rtol=1e-4, atol=1e-6)
    # resume: without the final scores, and interrupted after the last segment (segment 0 not done)
    before = _values(cli)
    shutil.rmtree(run / "scores")
    main(args)
    np.testing.assert_array_equal(_values(load_gradients(run / "scores")), before)
    shutil.rmtree(run / "scores")
    shutil.rmtree(run / "segment_0")
    main(args)
    np.testing.assert_array_equal(_values(load_gradients(run / "scores")), before)


def test_discrete_unroll_models_the_runs_momentum_and_resumes_it(lm, caplog):
    """checkpoint-4's optimizer.pt is AdamW (β₁ 0.9): with --unroll discrete both segments of the stage
    model its first moment (announced, recorded); the scores differ from the same run without an
    optimizer state; the buffer's cotangent is saved with the last segment, so a run resumed without
    segment 0 gives the same scores."""
    root, trainer, common = lm
    data, query = common["data"], common["query"]

    def args(run, segments):
        return ["source", str(run), "--segments", str(segments), "--dataset", data.dataset, "--split", data.split,
                "--truncation", "--max_length", "16", "--query.dataset", query.dataset, "--query.split",
                query.split, "--query.truncation", "--query.max_length", "16", "--device", "cpu", "--precision",
                "fp32", "--factor_dtype", "float64", "--token_batch_size", "64", "--top_k", "0",
                "--unroll", "discrete"]  # fmt: skip

    run = root / "momentum"
    main(args(run, trainer))
    ours = load_gradients(run / "scores")
    records = [s["momentum"] for s in ours.manifest.score["segments"]]
    assert all(r["form"] == "adam" and r["modelled"] and r["beta"] == pytest.approx(0.9) for r in records)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("momentum modelled" in m and "bias correction" in m for m in warnings)
    saved = Factors.load(run / "segment_1" / "queries").tensors
    assert all("passed_momentum" in d for d in saved.values())
    # the same checkpoints without the optimizer state: no momentum (nor decay), other scores
    bare = root / "bare_trainer"
    shutil.copytree(trainer, bare)
    (bare / "checkpoint-4" / "optimizer.pt").unlink()
    main(args(root / "no_momentum", bare))
    plain = _values(load_gradients(root / "no_momentum" / "scores"))
    assert np.abs(_values(ours) - plain).max() > 1e-3 * np.abs(plain).max()
    # resume with segment 0 to do again: the buffer's cotangent comes back from disk
    before = _values(ours)
    shutil.rmtree(run / "scores")
    shutil.rmtree(run / "segment_0")
    main(args(run, trainer))
    np.testing.assert_array_equal(_values(load_gradients(run / "scores")), before)
    # a run begun by a bergson that did not model momentum: segment 1's queries lack the buffer's
    # cotangent and segment 0 was scored without it (marked here by doubling its scores); both are
    # computed again, announced, and the scores are the momentum run's
    old = Factors.load(run / "segment_1" / "queries")
    Factors({n: {k: v for k, v in d.items() if k != "passed_momentum"} for n, d in old.tensors.items()},
            old.meta).save(run / "segment_1" / "queries")  # fmt: skip
    seg0 = run / "segment_0" / "scores.npz"
    with np.load(seg0) as f:
        np.savez(seg0, **{k: 2 * f[k] for k in f.files})
    shutil.rmtree(run / "scores")
    caplog.clear()
    main(args(run, trainer))
    np.testing.assert_array_equal(_values(load_gradients(run / "scores")), before)
    assert any("segment 1's saved queries" in r.getMessage() and "without the momentum" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    assert all("passed_momentum" in d for d in Factors.load(run / "segment_1" / "queries").tensors.values())


def test_stage_rows_fit_and_score_each_stage_on_its_own_rows(lm):
    """Two stages on rows 0-2 and 3-5 of one dataset: each segment scores only its stage's rows,
    and the last segment (the raw query, stage 1's curvature) equals the last segment of a
    one-stage run on rows 3-5 alone (the same documents, Fisher labels, scale and query)."""
    from bergson.methods.source import source

    root, trainer, common = lm
    two = root / "stages"
    staged = SourceConfig(run_path=str(two), segments=[str(trainer)] * 2, stage_rows=[":3", "3:"], **common)
    total = _values(source(staged))
    seg = [np.load(two / f"segment_{i}" / "scores.npz")["total"] for i in range(4)]
    for i, values in enumerate(seg):
        outside = slice(3, 6) if i < 2 else slice(0, 3)
        assert not values[outside].any() and np.abs(values).max() > 0
    np.testing.assert_allclose(sum(seg), total, rtol=1e-5, atol=1e-7 * np.abs(total).max())
    data = replace(common["data"], split="train[3:6]")
    alone = root / "alone"
    source(SourceConfig(run_path=str(alone), segments=[str(trainer)], **{**common, "data": data}))
    last = np.load(alone / "segment_1" / "scores.npz")["total"]
    np.testing.assert_allclose(seg[3][3:], last, rtol=1e-9, atol=1e-12 * np.abs(last).max())
    assert load_gradients(two / "scores").manifest.score["stage_rows"] == [":3", "3:"]
    with pytest.raises(BergsonError, match="--stage_rows '4:2'"):
        source(replace(staged, run_path=str(root / "bad_rows"), stage_rows=[":3", "4:2"]))
    with pytest.raises(BergsonError, match="2 --segments directories"):
        source(replace(staged, run_path=str(root / "bad_count"), stage_rows=[":3"]))


def test_the_command_refuses_bad_input_with_exit_1(lm, capfd):
    root, trainer, common = lm
    from bergson.methods.source import source

    with pytest.raises(SystemExit) as exit_:
        main(["source", str(root / "bad"), "--segments", str(trainer), "--models", "x", "--dataset", "d",
              "--query.dataset", "q"])  # fmt: skip
    assert exit_.value.code == 1
    err = capfd.readouterr().err
    assert "--segments with --models" in err and "Traceback" not in err
    with pytest.raises(BergsonError, match="--projection_dim"):
        source(
            replace(
                SourceConfig(run_path=str(root / "bad2"), segments=[str(trainer)], **common), projection_dim=4
            )
        )
    with pytest.raises(SystemExit):
        main(["source", str(root / "bad3"), "--segments", str(trainer), "--curvature_scale", "-1"])
    assert "--curvature_scale -1.0: must be 0 (automatic) or > 0" in capfd.readouterr().err


# ---------------------------------------------------------------------- Adam's preconditioning


def _adam_state(checkpoint, seed: int, v: float | None = None, eps: float = 1e-8, wd: float = 0.01) -> None:
    """A real AdamW state dict for the checkpoint's parameters (one step on random gradients; with
    ``v``, every bias-corrected second moment set to v) saved as its optimizer.pt."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, eps=eps, weight_decay=wd)
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():  # |g| from 0.003 to 0.03: D from about 30 to 300
        param.grad = 0.003 * 10 ** torch.rand(param.shape, generator=gen, dtype=param.dtype)
    opt.step()
    if v is not None:
        for state in opt.state.values():
            state["exp_avg_sq"].fill_(v * (1 - 0.999 ** float(state["step"])))
    torch.save(opt.state_dict(), checkpoint / "optimizer.pt")


def test_adam_preconditioner_is_exact_for_a_rank_one_second_moment(tmp_path):
    """C² = 1 / (sqrt(v̂) + eps) exactly when (sqrt(v̂) + eps)² is rank one: v̂ = r cᵀ with eps 0
    (the bias column, v̂_b = r c_b, included with include_bias), or a uniform v̂ with eps > 0."""
    from bergson.methods.source import adam_preconditioner

    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    r, c, cb = torch.rand(2) + 0.5, torch.rand(3) + 0.5, torch.tensor(0.7)
    for eps, weight_v, bias_v in (
        (0.0, torch.outer(r, c), r * cb),
        (0.05, torch.full((2, 3), 0.01), torch.full((2,), 0.01)),
    ):
        opt = torch.optim.AdamW(model.parameters(), lr=0.1, eps=eps)
        for param in model.parameters():
            param.grad = torch.ones_like(param)
        opt.step()
        for param, v in zip(model.parameters(), (weight_v, bias_v)):
            opt.state[param]["exp_avg_sq"] = v * (1 - 0.999)  # v̂ after one step
        path = tmp_path / "optimizer.pt"
        torch.save(opt.state_dict(), path)
        full = torch.cat([weight_v, bias_v[:, None]], 1).double()
        for bias in (True, False):
            c_out, c_in = adam_preconditioner(str(path), model, {"0": model[0]}, include_bias=bias)["0"]
            expected = 1 / (full.sqrt() + eps)
            torch.testing.assert_close(
                torch.outer(c_out, c_in) ** 2, expected if bias else expected[:, :3], rtol=1e-5, atol=0
            )


def test_adam_step_model_scales_the_run_by_its_optimizer_state(lm, tmp_path):
    """--step_model adam on real AdamW states differs from sgd and records its preconditioner; with
    every v̂ = c it equals sgd with each learning rate times D = 1 / (sqrt(c) + eps) (biases tracked:
    the bias column is scaled too); a checkpoint without optimizer.pt (or with an SGD one) is refused,
    naming it."""
    from bergson.methods.source import source, unroll_segment

    _, trainer, common = lm
    common = {**common, "modules": ["gpt_neox.layers.1.*"], "include_bias": True}  # fewer, cheaper passes
    data, query = common["data"], common["query"]
    real, uniform = tmp_path / "real", tmp_path / "uniform" / "checkpoint-4"
    shutil.copytree(trainer, real)
    shutil.copytree(trainer / "checkpoint-4", uniform)
    for step in (2, 4):
        _adam_state(real / f"checkpoint-{step}", step)
    _adam_state(uniform, 4, v=0.01, eps=0.05)
    args = ["--dataset", data.dataset, "--split", data.split, "--truncation", "--max_length", "16",
            "--query.dataset", query.dataset, "--query.split", query.split, "--query.truncation",
            "--query.max_length", "16", "--device", "cpu", "--precision", "fp32", "--factor_dtype", "float64",
            "--token_batch_size", "64", "--top_k", "0", "--modules", "gpt_neox.layers.1.*", "--include_bias",
            "--step_model", "adam"]  # fmt: skip
    main(["source", str(tmp_path / "run_real"), "--segments", str(real), *args])
    adam = load_gradients(tmp_path / "run_real" / "scores")
    sgd = source(SourceConfig(run_path=str(tmp_path / "run_sgd"), segments=[str(real)], **common))
    a, b = _values(adam), _values(sgd)
    assert np.abs(a).max() > 0
    cosine = (a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b)
    assert cosine < 0.999  # not the sgd scores, nor a multiple of them
    score = adam.manifest.score
    files = [str(real / f"checkpoint-{s}" / "optimizer.pt") for s in (2, 4)]
    assert score["step_model"] == "adam" and score["preconditioner"]["optimizer_states"] == files
    assert "rank one" in score["preconditioner"]["form"] and "Adam" in score["optimizer_note"]
    assert [s["optimizer_state"] for s in score["segments"]] == files
    # AdamW's weight decay (0.01, decoupled) is read from each checkpoint and recorded
    decays = score["segment_weight_decay"]
    assert [(w["optimizer_state"], w["weight_decay"], w["decoupled"]) for w in decays] == [
        (f, [0.01], True) for f in files
    ]

    # v̂ = 0.01 everywhere, eps 0.05: D = 1 / (0.1 + 0.05), and Adam is sgd at D times the rates, with
    # AdamW's decay W (not preconditioned by D) as the decay W / D of the scaled steps
    d = 1 / (0.1 + 0.05)
    one = ["--models", str(uniform), "--segment_steps", "2", "--segment_learning_rates", "0.1"]
    main(["source", str(tmp_path / "run_uniform"), *one, *args])
    ours = _values(load_gradients(tmp_path / "run_uniform" / "scores"))
    _adam_state(uniform, 4, v=0.01, eps=0.05, wd=0.01 / d)
    scaled = source(SourceConfig(run_path=str(tmp_path / "run_scaled"), models=[str(uniform)], segment_steps=[2],
                                 segment_learning_rates=[0.1 * d], **common))  # fmt: skip
    np.testing.assert_allclose(ours, _values(scaled), rtol=1e-6, atol=1e-9 * np.abs(ours).max())
    # ... and the rates matter in this regime (D without eps, 10, would give other scores)
    fitted = tmp_path / "run_scaled" / "segment_0"
    eigen, corrected = Factors.load(fitted / "eigen"), Factors.load(fitted / "corrected")
    queries = {
        n: t["grads"] for n, t in Factors.load(tmp_path / "run_scaled" / "query_gradients").tensors.items()
    }
    scale = Factors.load(fitted / "queries").meta["scale"]
    products = [
        unroll_segment(queries, Curvature(eigen, corrected, [0.2 * r]), scale=scale)[0] for r in (d, 10)
    ]
    gaps = [(products[0][n] - products[1][n]).abs().max() / products[0][n].abs().max() for n in queries]
    assert min(gaps) > 0.01

    (real / "checkpoint-2" / "optimizer.pt").unlink()
    with pytest.raises(BergsonError, match=r"checkpoint .*checkpoint-2 has no optimizer\.pt"):
        source(
            SourceConfig(
                run_path=str(tmp_path / "missing"), segments=[str(real)], step_model="adam", **common
            )
        )
    param = torch.nn.Parameter(torch.zeros(2))
    torch.save(torch.optim.SGD([param], lr=0.1).state_dict(), real / "checkpoint-2" / "optimizer.pt")
    with pytest.raises(BergsonError, match=r"does not hold Adam moments \(its optimizer: sgd"):
        source(
            SourceConfig(
                run_path=str(tmp_path / "sgd_state"), segments=[str(real)], step_model="adam", **common
            )
        )


def test_weight_decay_is_read_per_param_group(tmp_path):
    """Trainer-style groups (weights decayed, biases not): a tracked bias column gets its own rate; Adam's
    L2 (decoupled_weight_decay False) is told from AdamW; a state that does not fit the model is refused
    only when required."""
    from bergson.methods.source.command import weight_decay_of

    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    modules = {"0": model[0]}
    for cls, decoupled in ((torch.optim.AdamW, True), (torch.optim.Adam, False)):
        opt = cls(
            [
                {"params": [model[0].weight], "weight_decay": 0.1},
                {"params": [model[0].bias], "weight_decay": 0.0},
            ]
        )
        for param in model.parameters():
            param.grad = torch.ones_like(param)
        opt.step()
        torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
        decay, flag, record = weight_decay_of(str(tmp_path), model, modules, include_bias=True, required=True)
        expected = torch.tensor([[0.1, 0.1, 0.1, 0.0]] * 2, dtype=torch.float64)
        torch.testing.assert_close(decay["0"], expected)
        assert flag is decoupled and record["weight_decay"] == [0.0, 0.1] and record["decoupled"] is decoupled
        assert weight_decay_of(str(tmp_path), model, modules, include_bias=False, required=True)[0] == {
            "0": 0.1
        }
    other = torch.nn.Sequential(torch.nn.Linear(5, 2))
    with pytest.raises(BergsonError, match="does not match"):
        weight_decay_of(str(tmp_path), other, {"0": other[0]}, include_bias=False, required=True)
    decay, _, record = weight_decay_of(
        str(tmp_path), other, {"0": other[0]}, include_bias=False, required=False
    )
    assert decay == {} and "not modelled" in record["note"]
    (tmp_path / "optimizer.pt").unlink()
    assert weight_decay_of(str(tmp_path), model, modules, include_bias=True, required=True)[0] == {}
