"""The classic small classifier setting of the quality benchmarks: scikit-learn's digits
(shipped with scikit-learn, offline), logistic regression and a small MLP in torch (float64, CPU).

Training is deterministic full-batch Adam with L2 regularisation, written as a pure function of
the parameters and per-example weights w (the loss is Σ w_i ℓ_i / Σ w_i), so that

* many retrains (each a different w: removed examples get 0) run at once, as one stack of
  parameters trained with batched matrix products, and
* MAGIC differentiates the final query losses through all the steps with respect to w.

The attribution methods themselves go through bergson's Python API for custom models
(:func:`bergson.per_example_gradients`, :func:`bergson.gradient_scores`,
:func:`bergson.trackstar_scores`, :func:`bergson.fit_ekfac`, :func:`bergson.ekfac_scores`).
Scores are [training examples, queries], positive = training on the example lowers the
query's loss (bergson's orientation).
"""

from __future__ import annotations

import argparse
import itertools
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import bergson

Params = dict[str, torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]
MODELS = ("logreg", "mlp")


@dataclass
class Recipe:
    """Full-batch Adam on the weighted mean cross-entropy plus weight_decay/2 |θ|²."""

    steps: int = 100
    lr: float = 0.03
    weight_decay: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@dataclass
class Digits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    flipped: np.ndarray
    """Training rows whose label was changed (empty unless asked)."""


def run_header(name: str, args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    """What a digits benchmark's report starts with: its name, the command that reproduces it,
    the machine and the settings (``--out_dir`` aside)."""
    given = sys.argv[1:] if argv is None else argv
    return {
        "benchmark": name,
        "command": f"python -m benchmarks.quality.{name} " + " ".join(given),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "settings": {k: v for k, v in vars(args).items() if k != "out_dir"},
    }


def load_digits(
    seed: int = 0, train_size: int | None = None, test_size: int = 360, flip: float = 0.0
) -> Digits:
    """Pixel values scaled to [0, 1], a seeded train/test split, and optionally a seeded
    fraction ``flip`` of the training labels replaced by a different random class."""
    from sklearn.datasets import load_digits as sk_digits

    x, y = sk_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    test, train = order[:test_size], order[test_size:]
    if train_size is not None:
        train = train[:train_size]
    y_train = y[train].copy()
    flipped = np.sort(rng.choice(len(train), size=round(flip * len(train)), replace=False))
    y_train[flipped] = (y_train[flipped] + rng.integers(1, 10, size=len(flipped))) % 10
    as_x = lambda a: torch.as_tensor(a / 16.0, dtype=torch.float64)  # noqa: E731
    as_y = lambda a: torch.as_tensor(a, dtype=torch.int64)  # noqa: E731
    return Digits(as_x(x[train]), as_y(y_train), as_x(x[test]), as_y(y[test]), flipped)


def make_model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "logreg":
        return nn.Sequential(nn.Linear(64, 10)).double()
    if kind == "mlp":
        return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    raise ValueError(f"unknown model {kind!r}: choose one of {MODELS}")


def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Per-example cross-entropy, [B]: the loss bergson differentiates."""
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def sampled_loss_fn(seed: int, draws: int = 1) -> Callable[[nn.Module, Batch], torch.Tensor]:
    """Cross-entropy against labels drawn from the model's own predictions (the true Fisher): ``draws``
    rows per example, each with its own draw, so that the Fisher averages that many draws."""

    def fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        x, _ = batch
        logits = model(x.repeat_interleave(draws, 0))
        with torch.no_grad():
            gen = torch.Generator().manual_seed(seed)
            labels = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen).squeeze(1)
        return F.cross_entropy(logits, labels, reduction="none")

    return fn


def expected_fisher_loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The true Fisher exactly, as an expectation over the model's own labels rather than one draw:
    each example becomes one row per class c with loss sqrt(C p_c) ℓ(c) (p_c held fixed), so the mean
    over the C N rows of g gᵀ is (1/N) Σ_n Σ_c p_c g_c g_cᵀ. One draw per example (``sampled_loss_fn``)
    gives a Fisher of rank at most N with the noise of a single sample."""
    x, _ = batch
    classes = model(x[:1]).shape[-1]
    logits = model(x.repeat_interleave(classes, 0))
    labels = torch.arange(classes).repeat(len(x))
    with torch.no_grad():
        weight = (classes * torch.softmax(logits, -1).gather(1, labels[:, None]).squeeze(1)).sqrt()
    return weight * F.cross_entropy(logits, labels, reduction="none")


FISHERS = ("expected", "sampled")


def fisher_loss_fn(fisher: str, seed: int, draws: int = 1) -> Callable[[nn.Module, Batch], torch.Tensor]:
    """The loss whose per-example gradients define the EK-FAC family's Fisher (see ``FISHERS``;
    ``draws`` label draws per example for the sampled one)."""
    if fisher not in FISHERS:
        raise ValueError(f"unknown Fisher {fisher!r}: choose one of {FISHERS}")
    return expected_fisher_loss_fn if fisher == "expected" else sampled_loss_fn(seed, draws)


def add_fisher_args(p: argparse.ArgumentParser) -> None:
    """``--fisher`` and ``--fisher_samples``: which Fisher the EK-FAC family fits (see ``FISHERS``)."""
    p.add_argument(
        "--fisher",
        default="expected",
        choices=FISHERS,
        help="the EK-FAC family's Fisher: the expectation over the model's labels, or one draw per example",
    )
    p.add_argument(
        "--fisher_samples", type=int, default=1, help="label draws per example with --fisher sampled"
    )


def check_fisher_args(args: argparse.Namespace) -> None:
    if args.fisher_samples < 1 or (args.fisher == "expected" and args.fisher_samples != 1):
        raise SystemExit("--fisher_samples: a count >= 1 of label draws, with --fisher sampled only")


def batches(x: torch.Tensor, y: torch.Tensor, size: int = 256) -> list[Batch]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


# ---------------------------------------------------------------------- training


def forward(params: Params, x: torch.Tensor) -> torch.Tensor:
    """Logits [M, B, 10] of M stacked models (``params`` as ``named_parameters``, each with a
    leading model axis) of the layouts of :func:`make_model`: linear layers '0' (and '2', after
    a tanh)."""
    w0 = params["0.weight"]  # [M, out, in]: one GEMM for all models
    h = (x @ w0.reshape(-1, w0.shape[-1]).T).reshape(len(x), *w0.shape[:2]).transpose(0, 1)
    h = h + params["0.bias"].unsqueeze(1)
    if "2.weight" in params:
        h = torch.baddbmm(params["2.bias"].unsqueeze(1), torch.tanh(h), params["2.weight"].mT)
    return h


def objective(params: Params, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, wd: float) -> torch.Tensor:
    """Each model's training objective [M]: Σ w ℓ / Σ w + wd/2 |θ|² (w [M, N])."""
    logits = forward(params, x)
    ce = F.cross_entropy(logits.transpose(1, 2), y.expand(len(logits), -1), reduction="none")
    reg = sum((p**2).flatten(1).sum(1) for p in params.values())
    return (w * ce).sum(1) / w.sum(1) + 0.5 * wd * reg


def _adam(
    params: Params, m: Params, v: Params, grads: Params, t: int, r: Recipe
) -> tuple[Params, Params, Params]:
    b1, b2 = r.betas
    m = {k: b1 * m[k] + (1 - b1) * grads[k] for k in params}
    v = {k: b2 * v[k] + (1 - b2) * grads[k] ** 2 for k in params}
    new = {k: params[k] - r.lr * (m[k] / (1 - b1**t)) / ((v[k] / (1 - b2**t)).sqrt() + r.eps) for k in params}
    return new, m, v


def _run(
    init: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor,
    recipe: Recipe,
    graph: bool,
    on_step: Callable[[int, Params, Params], None] | None = None,
) -> tuple[Params, Params]:
    """Full-batch Adam for every row of ``weights`` [M, N]; with ``graph`` the whole run stays
    differentiable (in the weights). ``on_step(t, params, v)`` sees the state after each step t."""
    count = weights.shape[0]
    params = {
        k: p.detach().expand(count, *p.shape).clone().requires_grad_() for k, p in init.named_parameters()
    }
    m = {k: torch.zeros_like(p) for k, p in params.items()}
    v = {k: torch.zeros_like(p) for k, p in params.items()}
    names = list(params)
    for t in range(1, recipe.steps + 1):
        with torch.enable_grad():
            loss = objective(params, x, y, weights, recipe.weight_decay).sum()
            grads = dict(
                zip(names, torch.autograd.grad(loss, [params[k] for k in names], create_graph=graph))
            )
        params, m, v = _adam(params, m, v, grads, t, recipe)
        if not graph:
            params = {k: p.detach().requires_grad_() for k, p in params.items()}
            m = {k: p.detach() for k, p in m.items()}
            v = {k: p.detach() for k, p in v.items()}
        if on_step is not None:
            on_step(t, params, v)
    return params, v


def train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, recipe: Recipe
) -> tuple[Params, Params]:
    """Train one model per row of ``weights`` [M, N] from the model's parameters, all at once;
    returns the stacked final parameters and Adam's bias-corrected second moments."""
    params, v = _run(model, x, y, weights, recipe, graph=False)
    corrected = {k: s / (1 - recipe.betas[1] ** recipe.steps) for k, s in v.items()}
    return {k: p.detach() for k, p in params.items()}, corrected


def query_losses(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-query losses [M, Q] of stacked parameters."""
    logits = forward(params, x)
    return F.cross_entropy(logits.transpose(1, 2), y.expand(len(logits), -1), reduction="none")


def retrain_losses(
    init: nn.Module, data: Digits, removed: list[np.ndarray], recipe: Recipe, chunk: int = 64
) -> np.ndarray:
    """Query (test) losses [len(removed), Q] after training ``init`` (an untrained model, whose
    parameters every run starts from) without each set of rows."""
    model = init
    n = len(data.x_train)
    out = []
    for start in range(0, len(removed), chunk):
        w = torch.ones(len(removed[start : start + chunk]), n, dtype=torch.float64)
        for row, idx in enumerate(removed[start : start + chunk]):
            w[row, idx] = 0.0
        params, _ = train(model, data.x_train, data.y_train, w, recipe)
        out.append(query_losses(params, data.x_test, data.y_test))
    return torch.cat(out).numpy()


def trained(kind: str, data: Digits, recipe: Recipe, seed: int = 0) -> tuple[nn.Module, Params]:
    """The model trained on all of ``data`` (its parameters loaded) and Adam's second moments."""
    model = make_model(kind, seed)
    params, v = train(
        model, data.x_train, data.y_train, torch.ones(1, len(data.x_train), dtype=torch.float64), recipe
    )
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(params[k][0])
    return model, {k: s[0] for k, s in v.items()}


def checkpoints(
    kind: str, data: Digits, recipe: Recipe, at: list[int], seed: int = 0
) -> list[tuple[nn.Module, Params]]:
    """The training run of :func:`trained`, saved after each step in ``at``: the model and Adam's
    bias-corrected second moments there (what a run's checkpoints with their optimizer state hold)."""
    saved: list[tuple[nn.Module, Params]] = []

    def keep(t: int, params: Params, v: Params) -> None:
        if t in at:
            model = make_model(kind, seed)
            with torch.no_grad():
                for k, p in model.named_parameters():
                    p.copy_(params[k][0])
            saved.append((model, {k: s[0] / (1 - recipe.betas[1] ** t) for k, s in v.items()}))

    ones = torch.ones(1, len(data.x_train), dtype=torch.float64)
    _run(make_model(kind, seed), data.x_train, data.y_train, ones, recipe, graph=False, on_step=keep)
    return saved


# ---------------------------------------------------------------------- methods


def magic_scores(model: nn.Module, data: Digits, recipe: Recipe, seed: int = 0) -> np.ndarray:
    """MAGIC: the exact derivative of every query's final loss with respect to each training
    example's weight, by reverse-mode autograd through the whole (unrolled) training run;
    scores are −∂L_q/∂w_i (so positive = training on i lowers the query's loss).

    bergson's ``bergson magic`` replays token-weighted training of a causal LM from a recipe
    file; a custom model, loss and full-batch recipe is simplest unrolled with autograd here."""
    fresh = make_model(model_kind(model), seed)
    w = torch.ones(1, len(data.x_train), dtype=torch.float64, requires_grad=True)
    params, _ = _run(fresh, data.x_train, data.y_train, w, recipe, graph=True)
    losses = query_losses(params, data.x_test, data.y_test)[0]
    eye = torch.eye(len(losses), dtype=losses.dtype)
    (dw,) = torch.autograd.grad(losses, w, eye, is_grads_batched=True)
    return (-dw[:, 0, :]).T.numpy()


def model_kind(model: nn.Module) -> str:
    return "logreg" if len(model) == 1 else "mlp"  # type: ignore[arg-type]


def exact_influence(model: nn.Module, data: Digits, recipe: Recipe) -> np.ndarray:
    """Influence functions with the exact Hessian H of the training objective (all parameters,
    L2 term included): score = (1/N) ∇ℓ_qᵀ H⁻¹ ∇(ℓ_i + wd/2 |θ|²). The ground-truth reference
    for logistic regression, whose objective is strictly convex (H positive definite)."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    names = list(params)
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]
    flat0 = torch.cat([params[k].reshape(-1) for k in names])

    def unflat(flat: torch.Tensor) -> Params:
        return {k: t.reshape(s) for k, t, s in zip(names, flat.split(sizes), shapes)}

    def per_example(flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, unflat(flat), (x,)), y, reduction="none")

    n = len(data.x_train)
    flat = flat0.clone().requires_grad_()
    (g,) = torch.autograd.grad(per_example(flat, data.x_train, data.y_train).mean(), flat, create_graph=True)
    eye = torch.eye(len(flat0), dtype=flat0.dtype)
    (hess,) = torch.autograd.grad(g, flat, eye, is_grads_batched=True)  # one HVP per column
    hess = (hess + hess.T) / 2 + recipe.weight_decay * eye  # the L2 term's Hessian
    g_train = torch.func.jacrev(per_example)(flat0, data.x_train, data.y_train)  # [N, P]
    g_query = torch.func.jacrev(per_example)(flat0, data.x_test, data.y_test)
    g_train = g_train + recipe.weight_decay * flat0  # each example's share of the objective
    return (g_train @ torch.linalg.solve(hess, g_query.T) / n).numpy()


def method_scores(
    kind: str,
    model: nn.Module,
    second_moments: Params,
    data: Digits,
    recipe: Recipe,
    methods: tuple[str, ...],
    projection_dim: int = 0,
    seed: int = 0,
    seconds: dict[str, float] | None = None,
    fisher: str = "expected",
    fisher_samples: int = 1,
) -> dict[str, np.ndarray]:
    """Scores [N, Q] of every method through bergson's Python API (and the two references);
    ``seconds``, when given, receives each method's wall time (stores shared by two methods are
    counted in full for each). ``fisher``: the EK-FAC family's and SOURCE's Fisher (``FISHERS``), with
    ``fisher_samples`` label draws per example when sampled."""
    fisher_fn = fisher_loss_fn(fisher, seed, fisher_samples)
    clock: dict[str, float] = {} if seconds is None else seconds
    train_b = batches(data.x_train, data.y_train)
    query_b = batches(data.x_test, data.y_test)
    common = {"projection_dim": projection_dim, "include_bias": True, "progress": False, "seed": seed}
    normalizers: dict[str, bergson.AdamNormalizer] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            normalizers[name] = bergson.AdamNormalizer(
                second_moments[f"{name}.weight"], second_moments[f"{name}.bias"], eps=recipe.eps
            )
    out: dict[str, np.ndarray] = {}

    def timed(name: str, fn: Callable[[], np.ndarray], shared: float = 0.0) -> None:
        start = time.perf_counter()
        out[name] = fn()
        clock[name] = shared + time.perf_counter() - start

    def gradients(**kw: Any) -> tuple[Any, Any, float]:
        start = time.perf_counter()
        train = bergson.per_example_gradients(model, train_b, loss_fn, **kw, **common)
        queries = bergson.per_example_gradients(model, query_b, loss_fn, **kw, **common)
        return train, queries, time.perf_counter() - start

    if {"dot", "cosine"} & set(methods):
        train, queries, spent = gradients()
        if "dot" in methods:
            timed("dot", lambda: bergson.gradient_scores(train, queries).numpy(), spent)
        if "cosine" in methods:
            timed(
                "cosine", lambda: bergson.gradient_scores(train, queries, unit_normalize=True).numpy(), spent
            )
    if {"cosine_adam", "trackstar"} & set(methods):
        train, queries, spent = gradients(normalizers=normalizers)
        if "cosine_adam" in methods:
            timed(
                "cosine_adam",
                lambda: bergson.gradient_scores(train, queries, unit_normalize=True).numpy(),
                spent,
            )
        if "trackstar" in methods:
            timed("trackstar", lambda: bergson.trackstar_scores(train, queries, components=10).numpy(), spent)
    for name, solver in (("ekfac", "ekfac"), ("astra", "astra"), ("lissa", "lissa"), ("pcg", "pcg")):
        if name in methods:
            timed(name, lambda solver=solver: ekfac_family(model, train_b, query_b, fisher_fn, solver))
    if "trak" in methods:
        timed("trak", lambda: trak_model_scores(model, data, projection_dim, seed))
    if "trak4" in methods:

        def ensemble() -> np.ndarray:
            models = [model] + [trained(kind, data, recipe, seed + k)[0] for k in range(1, 4)]
            return np.mean([trak_model_scores(m, data, projection_dim, seed) for m in models], axis=0)

        timed("trak4", ensemble)
    if {"source_adam", "source_adam_discrete"} & set(methods):
        saved = checkpoints(kind, data, recipe, source_steps(recipe.steps), seed)  # the run's own: not timed
        for name, momentum in (("source_adam", False), ("source_adam_discrete", True)):
            if name in methods:
                timed(name, lambda m=momentum: source_scores(saved, train_b, query_b, recipe, fisher_fn, m))
    if "magic" in methods:
        timed("magic", lambda: magic_scores(model, data, recipe, seed))
    if "exact_if" in methods:
        timed("exact_if", lambda: exact_influence(model, data, recipe))
    return out


IHVP_STEPS = 20


def ekfac_family(
    model: nn.Module,
    train_b: list[Batch],
    query_b: list[Batch],
    fisher_fn: Callable[[nn.Module, Batch], torch.Tensor],
    solver: str,
) -> np.ndarray:
    """EK-FAC influence (the Fisher of ``fisher_fn``'s gradients), its inverse-Fisher product by EK-FAC
    itself or by ``IHVP_STEPS`` ASTRA, LiSSA or PCG iterations on that Fisher of the training batches."""
    factors = bergson.fit_ekfac(model, train_b, fisher_fn, include_bias=True, progress=False)
    iterations: dict[str, Any] = {} if solver == "ekfac" else {"ihvp_steps": IHVP_STEPS}
    return bergson.ekfac_scores(
        model,
        factors,
        train_b,
        query_b,
        loss_fn,
        progress=False,
        ihvp=solver,
        **iterations,
    ).numpy()


SOURCE_CHECKPOINTS = 4


def source_steps(steps: int) -> list[int]:
    """The steps of SOURCE's checkpoints: ``SOURCE_CHECKPOINTS`` evenly spaced, the last one final."""
    return [round(steps * (i + 1) / SOURCE_CHECKPOINTS) for i in range(SOURCE_CHECKPOINTS)]


def source_scores(
    saved: list[tuple[nn.Module, Params]],
    train_b: list[Batch],
    query_b: list[Batch],
    recipe: Recipe,
    fisher_fn: Callable[[nn.Module, Batch], torch.Tensor],
    momentum: bool = False,
) -> np.ndarray:
    """SOURCE with Adam's steps over the checkpoints of :func:`source_steps` (:func:`bergson.source_scores`):
    each checkpoint stands for the steps nearer to it than to its neighbours, its curvature is the
    Fisher (of ``fisher_fn``'s gradients) of C ⊙ G with C = D^{1/2} (Adam's D from the checkpoint's second moments, rank one per layer),
    and the recipe's L2 term is Adam's coupled weight decay. With ``momentum``, Adam's first moment too
    (β₁, gain 1 - β₁, the bias correction on the rates; discrete unroll); otherwise it is not modelled."""
    at = source_steps(recipe.steps)
    bounds = [0] + [(a + b) // 2 for a, b in itertools.pairwise(at)] + [recipe.steps]
    b1 = recipe.betas[0]
    rate = (lambda t: recipe.lr / (1 - b1**t)) if momentum else (lambda t: recipe.lr)
    lrs = [[rate(t) for t in range(lo + 1, hi + 1)] for lo, hi in itertools.pairwise(bounds)]
    pres = []
    for model, v in saved:
        pres.append(
            {
                name: bergson.adam_step_preconditioner(
                    bergson.AdamNormalizer(v[f"{name}.weight"], v[f"{name}.bias"], eps=recipe.eps)
                )
                for name, module in model.named_modules()
                if isinstance(module, nn.Linear)
            }
        )
    return bergson.source_scores(
        [m for m, _ in saved],
        lrs,
        train_b,
        query_b,
        loss_fn,
        fisher_loss_fn=fisher_fn,
        preconditioners=pres,
        weight_decay=recipe.weight_decay,
        decoupled_weight_decay=False,
        momentum=b1 if momentum else 0.0,
        momentum_gain=1 - b1 if momentum else 1.0,
        unroll="discrete" if momentum else "exp",
        include_bias=True,
        progress=False,
    ).numpy()


def trak_model_scores(model: nn.Module, data: Digits, projection_dim: int, seed: int) -> np.ndarray:
    """TRAK for one trained model: projected per-example gradients Φ, Q = 1 − p(label) of each
    training example, diag(Q) Φ (ΦᵀΦ + λI)⁻¹ Φ_qᵀ (:func:`bergson.trak_scores`, damping 0.1 relative)."""
    common = {"projection_dim": projection_dim, "include_bias": True, "progress": False, "seed": seed}
    train = bergson.per_example_gradients(model, batches(data.x_train, data.y_train), loss_fn, **common)
    queries = bergson.per_example_gradients(model, batches(data.x_test, data.y_test), loss_fn, **common)
    q = -np.expm1(-train.losses.double().numpy())  # 1 - p(label): the loss is -log p
    return bergson.trak_scores(train.vectors.numpy(), queries.vectors.numpy(), q)


METHODS = (
    "dot",
    "cosine",
    "cosine_adam",
    "trackstar",
    "ekfac",
    "astra",
    "lissa",
    "pcg",
    "trak",
    "trak4",
    "source_adam",
    "source_adam_discrete",
    "magic",
    "exact_if",
)
LABELS = {
    "dot": "gradient dot",
    "cosine": "gradient cosine",
    "cosine_adam": "cosine, Adam-normalized",
    "trackstar": "TrackStar",
    "ekfac": "EK-FAC",
    "astra": "ASTRA (20 steps)",
    "lissa": "LiSSA (20 steps)",
    "pcg": "PCG (20 steps)",
    "trak": "TRAK (one model)",
    "trak4": "TRAK (4 models)",
    "source_adam": f"SOURCE, Adam steps ({SOURCE_CHECKPOINTS} checkpoints)",
    "source_adam_discrete": f"SOURCE, Adam steps and first moment, discrete ({SOURCE_CHECKPOINTS} checkpoints)",
    "magic": "MAGIC",
    "exact_if": "exact IF (full Hessian)",
}
