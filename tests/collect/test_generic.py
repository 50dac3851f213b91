"""The model-agnostic Python API against naive per-example autograd (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bergson import (
    AdafactorNormalizer,
    AdamNormalizer,
    BergsonError,
    ekfac_scores,
    fit_ekfac,
    fit_second_moment,
    gradient_scores,
    per_example_gradients,
    projection_matrix,
    trackstar_scores,
)
from bergson.transforms.ekfac import dense_fisher

N_IN, HIDDEN, CLASSES, N = 7, 5, 3, 13


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(N_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES)).double()


def data(seed: int = 1, n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, N_IN, generator=gen, dtype=torch.float64), torch.randint(
        0, CLASSES, (n,), generator=gen
    )


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def batched(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def naive(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bias: bool) -> dict[str, torch.Tensor]:
    """Per-example [N, out, in(+1)] weight (and bias, as a last column) gradients, one backward each."""
    out: dict[str, list[torch.Tensor]] = {"0": [], "2": []}
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        for name in out:
            layer = model.get_submodule(name)
            assert isinstance(layer, nn.Linear) and layer.weight.grad is not None
            g = layer.weight.grad.clone()
            if bias:
                assert layer.bias is not None and layer.bias.grad is not None
                g = torch.cat([g, layer.bias.grad[:, None]], 1)
            out[name].append(g)
    model.zero_grad()
    return {k: torch.stack(v) for k, v in out.items()}


def project(name: str, grads: torch.Tensor, p: int) -> torch.Tensor:
    left = projection_matrix(0, name, "left", p, grads.shape[1], dtype=torch.float64)
    right = projection_matrix(0, name, "right", p, grads.shape[2], dtype=torch.float64)
    return (left @ grads @ right.T).reshape(len(grads), -1)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("p", [0, 3])
def test_matches_naive_autograd(bias: bool, p: int) -> None:
    model, (x, y) = mlp(), data()
    got = per_example_gradients(
        model, batched(x, y, 5), loss_fn, projection_dim=p, include_bias=bias, progress=False
    )
    truth = naive(model, x, y, bias)
    blocks = got.by_module()
    assert list(blocks) == ["0", "2"]
    for name, g in truth.items():
        if p == 0:  # the weight's own layout, bias last
            w = g[..., : g.shape[-1] - int(bias)].reshape(N, -1)
            want = torch.cat([w, g[..., -1]], 1) if bias else w
        else:
            want = project(name, g, p)
        torch.testing.assert_close(blocks[name], want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.losses, loss_fn(model, (x, y)).detach())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_batch_size_invariance() -> None:
    model, (x, y) = mlp(), data()
    ref = per_example_gradients(model, batched(x, y, N), loss_fn, projection_dim=4, progress=False)
    for size in (1, 4):
        got = per_example_gradients(model, batched(x, y, size), loss_fn, projection_dim=4, progress=False)
        torch.testing.assert_close(got.vectors, ref.vectors, rtol=1e-10, atol=1e-12)


def test_sequence_inputs_sum_positions() -> None:
    """[B, T, in] inputs: an example's gradient is the sum over its positions."""
    torch.manual_seed(0)
    linear = nn.Linear(N_IN, CLASSES).double()
    layer = nn.Sequential(linear)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, N_IN, generator=gen, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (4, 6), generator=gen)

    def seq_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        xs, ys = batch
        return F.cross_entropy(model(xs).transpose(1, 2), ys, reduction="none").sum(1)

    got = per_example_gradients(layer, [(x, y)], seq_loss, projection_dim=0, progress=False).vectors
    for i in range(4):
        (w,) = torch.autograd.grad(seq_loss(layer, (x[i : i + 1], y[i : i + 1])).sum(), [linear.weight])
        torch.testing.assert_close(got[i], w.reshape(-1))


@pytest.mark.parametrize("kind", ["adafactor", "adam"])
def test_normalizers_divide_by_the_second_moment(kind: str) -> None:
    model, (x, y) = mlp(), data()
    gen = torch.Generator().manual_seed(5)
    norms: dict[str, AdafactorNormalizer | AdamNormalizer] = {}
    dense: dict[str, torch.Tensor] = {}
    for name, (out, n_in) in {"0": (HIDDEN, N_IN), "2": (CLASSES, HIDDEN)}.items():
        if kind == "adam":
            v = torch.rand(out, n_in, generator=gen, dtype=torch.float64) + 0.1
            norms[name], dense[name] = AdamNormalizer(v, eps=0.0), v
        else:
            row = torch.rand(out, generator=gen, dtype=torch.float64) + 0.1
            col = torch.rand(n_in, generator=gen, dtype=torch.float64) + 0.1
            norms[name] = AdafactorNormalizer(row, col, eps=0.0)
            dense[name] = torch.outer(row, col) / row.sum()
    got = per_example_gradients(
        model, batched(x, y, 6), loss_fn, projection_dim=3, normalizers=norms, progress=False
    ).by_module()
    for name, g in naive(model, x, y, bias=False).items():
        torch.testing.assert_close(got[name], project(name, g / dense[name].sqrt(), 3), rtol=1e-9, atol=1e-12)


def _dense_power(vectors: torch.Tensor, damping: float, power: float) -> torch.Tensor:
    h = vectors.T @ vectors / len(vectors)
    lam, q = torch.linalg.eigh(h)
    lam = lam.clamp(min=0)
    return (q * (lam + damping * lam.mean()) ** power) @ q.T


def test_preconditioned_scores_match_dense_algebra() -> None:
    model, (x, y) = mlp(), data()
    xq, yq = data(seed=9, n=4)
    train = per_example_gradients(model, batched(x, y, 5), loss_fn, projection_dim=2, progress=False)
    queries = per_example_gradients(model, [(xq, yq)], loss_fn, projection_dim=2, progress=False)
    torch.testing.assert_close(gradient_scores(train, queries), train.vectors @ queries.vectors.T)
    h = fit_second_moment(train, damping=0.1)
    got = gradient_scores(train, queries, preconditioner=h)
    cos = gradient_scores(train, queries, preconditioner=h, unit_normalize=True)
    ts = trackstar_scores(train, queries, components=0, damping=0.1)
    want = torch.zeros(N, 4, dtype=torch.float64)
    t_half, q_half = [], []
    for m in train.layouts:
        t = train.vectors[:, m.offset : m.offset + m.dim]
        q = queries.vectors[:, m.offset : m.offset + m.dim]
        want += t @ _dense_power(t, 0.1, -1.0) @ q.T
        half = _dense_power(t, 0.1, -0.5)
        t_half.append(t @ half)
        q_half.append(q @ half)
    want_cos = F.normalize(torch.cat(t_half, 1), dim=1) @ F.normalize(torch.cat(q_half, 1), dim=1).T
    # the second moment is summed in float32 by the library's StatisticsSink
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cos, want_cos, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ts, want_cos, rtol=1e-4, atol=1e-6)
    mixed = trackstar_scores(train, queries, components=1)
    assert mixed.shape == (N, 4) and mixed.abs().max() <= 1 + 1e-9
    assert not torch.allclose(mixed, ts)


def test_mismatched_spaces_are_refused() -> None:
    model, (x, y) = mlp(), data()
    a = per_example_gradients(model, [(x, y)], loss_fn, projection_dim=2, progress=False)
    b = per_example_gradients(model, [(x, y)], loss_fn, projection_dim=3, progress=False)
    with pytest.raises(BergsonError, match="projection_dim"):
        gradient_scores(a, b)
    with pytest.raises(BergsonError, match="one loss per example"):
        per_example_gradients(model, [(x, y)], lambda m, b: loss_fn(m, b).sum(), progress=False)


def test_ekfac_matches_dense_algebra() -> None:
    """Covariances, corrected eigenvalues and scores against quantities built densely from naive
    per-example gradients and layer activations."""
    model, (x, y) = mlp(), data()
    xq, yq = data(seed=9, n=3)
    factors = fit_ekfac(model, batched(x, y, 4), loss_fn, progress=False)
    truth = naive(model, x, y, bias=False)
    hidden = torch.tanh(model[0](x)).detach()
    inputs = {"0": x, "2": hidden}
    for name, g in truth.items():
        d = factors.eigen.tensors[name]
        qa, qs = d["A_eigenvectors"], d["S_eigenvectors"]
        a = inputs[name].T @ inputs[name] / N
        torch.testing.assert_close((qa * d["A_eigenvalues"]) @ qa.T, a, rtol=1e-9, atol=1e-10)
        # per-example output gradients: G_n = g_n x_nᵀ, so g_n = G_n x_n / |x_n|²
        out_grads = torch.einsum("noi,ni->no", g, inputs[name]) / (inputs[name] ** 2).sum(1, keepdim=True)
        s = out_grads.T @ out_grads / N
        torch.testing.assert_close((qs * d["S_eigenvalues"]) @ qs.T, s, rtol=1e-9, atol=1e-10)
        fisher = g.reshape(N, -1).T @ g.reshape(N, -1) / N
        q = torch.kron(qs, qa)
        torch.testing.assert_close(
            factors.corrected.tensors[name]["eigenvalues"].reshape(-1), torch.diag(q.T @ fisher @ q)
        )
    scores = ekfac_scores(model, factors, batched(x, y, 5), [(xq, yq)], loss_fn, damping=0.1, progress=False)
    query_truth = naive(model, xq, yq, bias=False)
    want = torch.zeros(N, 3, dtype=torch.float64)
    for name, g in truth.items():
        lam = factors.corrected.tensors[name]["eigenvalues"]
        f = dense_fisher(factors.eigen, lam, name)
        solved = torch.linalg.solve(
            f + 0.1 * lam.mean() * torch.eye(len(f), dtype=f.dtype), query_truth[name].reshape(3, -1).T
        )
        want += g.reshape(N, -1) @ solved
    torch.testing.assert_close(scores, want, rtol=1e-8, atol=1e-10)


def test_source_scores_equal_the_unrolled_maths_on_naive_gradients() -> None:
    """SOURCE for a custom model over two checkpoints (Adam's rank-one C on the first, coupled L2
    decay, the bias column tracked): the curvature of C ⊙ G is fitted (A and S scaled), and the
    scores equal Σ_l ⟨R_l q_l, G_{n,l}⟩ of :func:`bergson.unrolled_queries` on naive per-example
    gradients at each checkpoint, with the query gradients taken at the last one."""
    from bergson import source_scores, unrolled_queries
    from bergson.methods.source import Curvature

    ckpts, (x, y) = [mlp(0), mlp(3)], data()
    xq, yq = data(seed=9, n=3)
    gen = torch.Generator().manual_seed(2)
    pre = {
        name: (0.5 + torch.rand(m.out_features, generator=gen, dtype=torch.float64),
               0.5 + torch.rand(m.in_features + 1, generator=gen, dtype=torch.float64))
        for name, m in ckpts[0].named_modules() if isinstance(m, nn.Linear)
    }  # fmt: skip
    lrs = [[0.3, 0.2], [0.05]]
    common = {"include_bias": True, "progress": False}
    ours = source_scores(ckpts, lrs, batched(x, y, 5), [(xq, yq)], loss_fn, preconditioners=[pre, None],
                         weight_decay=0.02, decoupled_weight_decay=False, damping=0.05, **common)  # fmt: skip

    fitted = [fit_ekfac(ckpts[0], batched(x, y, 4), loss_fn, scales=pre, **common),
              fit_ekfac(ckpts[1], batched(x, y, 4), loss_fn, **common)]  # fmt: skip
    plain = fit_ekfac(ckpts[0], batched(x, y, 4), loss_fn, **common)
    for name, (sg, sx) in pre.items():  # A and S of C ⊙ G: diag(sx) A diag(sx), diag(sg) S diag(sg)
        for key, s in (("A", sx), ("S", sg)):
            d, p = fitted[0].eigen.tensors[name], plain.eigen.tensors[name]
            scaled = (d[f"{key}_eigenvectors"] * d[f"{key}_eigenvalues"]) @ d[f"{key}_eigenvectors"].T
            want = s[:, None] * (
                (p[f"{key}_eigenvectors"] * p[f"{key}_eigenvalues"]) @ p[f"{key}_eigenvectors"].T
            )
            torch.testing.assert_close(scaled, want * s[None], rtol=1e-9, atol=1e-12)
    curvatures = [
        Curvature(f.eigen, f.corrected, r, c, 0.02, False) for f, r, c in zip(fitted, lrs, (pre, None))
    ]
    products = unrolled_queries(naive(ckpts[1], xq, yq, bias=True), curvatures, damping=0.05)
    want = sum(
        torch.einsum("noi,qoi->nq", naive(m, x, y, bias=True)[name], p[name])
        for m, p in zip(ckpts, products)
        for name in p
    )
    assert isinstance(want, torch.Tensor) and want.abs().max() > 1e-3
    torch.testing.assert_close(ours, want, rtol=1e-8, atol=1e-10)
    # one checkpoint and a huge learning-rate sum: EK-FAC's damped influence
    one = source_scores([ckpts[1]], [[1e15]], batched(x, y, 5), [(xq, yq)], loss_fn, damping=0.1, **common)
    ekfac = ekfac_scores(
        ckpts[1], fitted[1], batched(x, y, 5), [(xq, yq)], loss_fn, damping=0.1, progress=False
    )
    torch.testing.assert_close(one, ekfac, rtol=1e-6, atol=1e-9)
    with pytest.raises(BergsonError, match="learning-rate lists"):
        source_scores(ckpts, lrs[:1], batched(x, y, 5), [(xq, yq)], loss_fn, **common)
