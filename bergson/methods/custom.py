"""Attribution methods for a custom model and loss, from Python (no tokenizer, no store).

Each function composes the library's own pieces on the vectors of
:func:`~bergson.per_example_gradients` or on the passes of ``bergson ekfac``, both on the
one pass engine (:class:`~bergson.collect.engine.PassEngine`):

* :func:`gradient_scores`: gradient inner products or cosines, optionally with a
  preconditioner H (H⁻¹ between the sides, or H^{-1/2} on each side for cosines), exactly as
  ``bergson score`` plans them (:func:`~bergson.transforms.preconditioners.plan_powers`).
  Optimizer normalization is chosen when collecting (``normalizers=``).
* :func:`fit_second_moment` and :func:`trackstar_scores`: TrackStar's mixed train/query
  second moment (:func:`~bergson.mix_preconditioners`), applied as H^{-1/2} on both sides,
  then cosines.
* :func:`fit_ekfac` and :func:`ekfac_scores`: EK-FAC influence for the ``nn.Linear`` layers
  of the model: the statistics, query products and scores of :mod:`bergson.methods.ekfac`
  on the model's own batches and loss (one implementation, two entry points).
* :func:`source_scores`: SOURCE over a run's checkpoints (:mod:`bergson.methods.source`'s maths
  on the same passes).

Every score has the library's orientation: positive means that training on the example lowers
the query's loss. Scores are [training examples, queries].
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..collect.engine import LossFn
from ..collect.generic import ExampleGradients
from ..collect.hooks import resolve_modules
from ..core.rows import unit_rows
from ..errors import BergsonError
from ..transforms.ekfac import Factors, eigendecompose
from ..transforms.preconditioners import (
    Preconditioner,
    StatisticsSink,
    mix_preconditioners,
    plan_powers,
)
from .ekfac import (
    BatchSource,
    IhvpOptions,
    batch_products,
    correction_sums,
    covariance_sums,
    example_gradients,
    precondition_queries,
    score_modules,
    solve,
)


def _layout(grads: ExampleGradients) -> dict[str, Any]:
    return {
        "model": {"name": "custom"},
        "projection": None,
        "normalizer": None,
        "modules": [asdict(m) for m in grads.layouts],
    }


def _check_same_space(train: ExampleGradients, queries: ExampleGradients) -> None:
    if [(m.name, m.dim) for m in train.layouts] != [(m.name, m.dim) for m in queries.layouts]:
        raise BergsonError(
            "the training and query gradients have different module blocks; collect both with the "
            "same modules, projection_dim and include_bias"
        )


def fit_second_moment(
    grads: ExampleGradients, *, damping: float = 0.1, damping_mode: str = "relative"
) -> Preconditioner:
    """The per-module second moment (1/N) Σ v vᵀ of the vectors (all-zero rows not counted),
    as a :class:`~bergson.Preconditioner` with the given damping."""
    sink = StatisticsSink({m.name: m.dim for m in grads.layouts})
    zeros = np.zeros(len(grads))
    sink.write(np.arange(len(grads)), grads.vectors.numpy(), zeros, zeros)
    return sink.preconditioner(_layout(grads), damping, damping_mode)


def gradient_scores(
    train: ExampleGradients,
    queries: ExampleGradients,
    *,
    preconditioner: Preconditioner | None = None,
    unit_normalize: bool = False,
) -> torch.Tensor:
    """Scores [N, Q]: gᵀ H⁻¹ q (H = identity without a preconditioner), or with
    ``unit_normalize`` the cosine of H^{-1/2} g and H^{-1/2} q. Collect the vectors without
    unit normalization or a transform; this function applies both."""
    _check_same_space(train, queries)
    tv, qv = train.vectors, queries.vectors
    if preconditioner is not None:
        train_power, query_power = plan_powers(0.0, 0.0, unit_normalize)
        tv = preconditioner.apply(tv, train_power, train.layouts)
        qv = preconditioner.apply(qv, query_power, queries.layouts)
    if unit_normalize:
        tv, qv = unit_rows(tv), unit_rows(qv)
    return tv @ qv.T


def trackstar_scores(
    train: ExampleGradients,
    queries: ExampleGradients,
    *,
    components: int = 10,
    damping: float = 0.1,
    damping_mode: str = "relative",
    statistics: ExampleGradients | None = None,
) -> torch.Tensor:
    """TrackStar scores [N, Q]: cosines of H^{-1/2} g and H^{-1/2} q, with H the mixture of the
    query set's and the training set's second moments that down-weights the top ``components``
    query directions (0: the training second moment alone). Collect ``train`` and ``queries``
    with the optimizer ``normalizers`` for the full method. ``statistics`` (default ``train``)
    are the vectors the training second moment is fitted on."""
    _check_same_space(train, queries)
    if components < 0:
        raise BergsonError(f"components {components}: must be >= 0")
    h = fit_second_moment(statistics or train, damping=damping, damping_mode=damping_mode)
    if components > 0:
        q = fit_second_moment(queries, damping=damping, damping_mode=damping_mode)
        h = mix_preconditioners(h, q, components)
    return gradient_scores(train, queries, preconditioner=h, unit_normalize=True)


# ---------------------------------------------------------------------- EK-FAC


@dataclass
class EkfacFactors:
    """The EK-FAC curvature of a custom model's tracked layers: Kronecker eigenbases
    (``eigen``, as :func:`~bergson.transforms.ekfac.eigendecompose` writes them) and the
    corrected eigenvalues (``corrected``, ``tensors[module]["eigenvalues"]`` [out, in])."""

    modules: dict[str, nn.Module]
    eigen: Factors
    corrected: Factors
    include_bias: bool = False
    batches: list[Any] | None = None
    """The batches the factors were fitted on, with ``loss_fn`` (which defines the Fisher): the
    Fisher-vector products of ``ekfac_scores(ihvp="astra" | "lissa")`` run on them."""
    loss_fn: LossFn | None = None


def fit_ekfac(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossFn,
    *,
    modules: Mapping[str, nn.Module] | Sequence[str] | None = None,
    include_bias: bool = False,
    progress: bool = True,
    scales: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> EkfacFactors:
    """EK-FAC factors from two passes over ``batches`` (float64 sums), with the statistics of
    ``bergson ekfac`` (:mod:`bergson.methods.ekfac.passes`).

    ``loss_fn`` defines the Fisher: pass the model's loss with labels sampled from its own
    predictions for the true Fisher, or with the dataset's labels for the empirical Fisher.
    A = (1/T) Σ x xᵀ over the T positions (T = N for inputs without a sequence axis),
    S = (1/N) Σ g gᵀ, and Λ = (1/N) Σ_n (Q_Sᵀ G_n Q_A)². ``scales`` (per module: on the output
    gradients [out], on the inputs [in, plus the bias column]) fit the curvature of C ⊙ G,
    C = outer(the two), as SOURCE's Adam step model needs."""
    tracked = resolve_modules(model, modules)
    batches = list(batches)
    source = BatchSource(model, batches, loss_fn, tracked, include_bias, progress, scales)
    sums, positions, n = covariance_sums(source, torch.float64)
    if n == 0:
        raise BergsonError("batches is empty: the Fisher is undefined")
    eigen = eigendecompose(
        Factors({k: {"A": d["A"] / max(positions[k], 1), "S": d["S"] / n} for k, d in sums.items()})
    )
    corrections = correction_sums(source, eigen, torch.float64)
    corrected = Factors({k: {"eigenvalues": s / n} for k, s in corrections.items()})
    return EkfacFactors(tracked, eigen, corrected, include_bias, batches, loss_fn)


def ekfac_scores(
    model: nn.Module,
    factors: EkfacFactors,
    train_batches: Iterable[Any],
    query_batches: Iterable[Any],
    loss_fn: LossFn,
    *,
    damping: float = 0.1,
    damping_mode: str = "relative",
    progress: bool = True,
    ihvp: str = "ekfac",
    ihvp_steps: int = 10,
    ihvp_batch_size: int = 0,
    ihvp_step_size: float = 0.0,
    ihvp_seed: int = 0,
) -> torch.Tensor:
    """Influence scores [N, Q] = Σ_modules ⟨(F + δI)⁻¹ G_q, G_n⟩ of every training example n
    on every query q, both gradients of ``loss_fn`` (with the dataset's labels), scored as
    ``bergson ekfac`` scores documents (:func:`bergson.methods.ekfac.score_modules`).

    ``ihvp``: "ekfac" (EK-FAC's own product), or "astra" / "lissa" (:mod:`bergson.methods.ekfac.ihvp`),
    ``ihvp_steps`` iterations on the Fisher of the batches and loss the factors were fitted on,
    ``ihvp_batch_size`` of those batches per iteration (0: all)."""
    solver = IhvpOptions(ihvp, ihvp_steps, ihvp_batch_size, ihvp_step_size, ihvp_seed)
    solver.check()

    def source(batches: Iterable[Any]) -> BatchSource:
        return BatchSource(model, list(batches), loss_fn, factors.modules, factors.include_bias, progress)

    grads = example_gradients(source(query_batches))
    solved = None
    if solver.method != "ekfac":
        if factors.batches is None or factors.loss_fn is None:
            raise BergsonError(
                f"ihvp={ihvp!r} needs the batches and loss the factors were fitted on; fit them with fit_ekfac"
            )
        products = batch_products(
            model,
            factors.batches,
            factors.loss_fn,
            factors.modules,
            factors.include_bias,
            ihvp_batch_size,
            ihvp_seed,
        )
        solved = solve(grads, factors.eigen, factors.corrected, damping, damping_mode, solver, products)
    queries = precondition_queries(
        grads, factors.eigen, factors.corrected, damping, damping_mode, solved=solved
    )
    per_module = score_modules(source(train_batches), queries, torch.float64)
    return torch.from_numpy(sum(per_module.values()))  # type: ignore[arg-type]


def source_scores(
    checkpoints: Sequence[nn.Module],
    learning_rates: Sequence[Sequence[float]],
    train_batches: Iterable[Any],
    query_batches: Iterable[Any],
    loss_fn: LossFn,
    *,
    fisher_loss_fn: LossFn | None = None,
    preconditioners: Sequence[Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None] | None = None,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = True,
    momentum: float = 0.0,
    momentum_gain: float = 1.0,
    query_model: nn.Module | None = None,
    modules: Sequence[str] | None = None,
    include_bias: bool = False,
    damping: float = 0.1,
    damping_mode: str = "relative",
    unroll: str = "exp",
    scale: float = 1.0,
    progress: bool = True,
) -> torch.Tensor:
    """SOURCE scores [N, Q] over a run's checkpoints (in training order), checkpoint l standing for
    the steps whose learning rates are ``learning_rates[l]``: Σ_l ⟨R_l q_l, G_{n,l}⟩ with each
    checkpoint's EK-FAC curvature, q_L the query gradients at ``query_model`` (default: the last
    checkpoint) and G_{n,l} example n's gradient of ``loss_fn`` at checkpoint l (see
    :mod:`bergson.methods.source.maths`, which also says what ``unroll``, ``scale`` and the damping do).

    ``fisher_loss_fn`` defines each checkpoint's Fisher (default ``loss_fn``: the empirical Fisher).
    ``preconditioners``: per checkpoint, Adam's C = D^{1/2} per module as (c_out, c_in) (for example
    :func:`~bergson.methods.source.adam_step_preconditioner` of the checkpoint's second moments), or
    None for plain gradient descent; the curvature is then fitted on C ⊙ G. ``weight_decay``: the
    decay rate of every tracked parameter, decoupled (AdamW) or, with ``decoupled_weight_decay``
    False, coupled L2 preconditioned by Adam's D. ``momentum`` and ``momentum_gain``: the buffer the
    steps followed, ν ← momentum ν + gain ∇J (Adam's first moment: β₁ and 1 - β₁, with the bias
    correction in ``learning_rates``; SGD's: μ and 1), modelled with ``unroll="discrete"``."""
    from .source.maths import Curvature, unroll_segment

    if len(checkpoints) != len(learning_rates) or not checkpoints:
        raise BergsonError(
            f"{len(checkpoints)} checkpoints and {len(learning_rates)} learning-rate lists: give one list of "
            "the steps' learning rates per checkpoint, at least one"
        )
    pres = list(preconditioners) if preconditioners is not None else [None] * len(checkpoints)
    if len(pres) != len(checkpoints):
        raise BergsonError(
            f"{len(pres)} preconditioners for {len(checkpoints)} checkpoints: give one per checkpoint"
        )
    train_batches, query_batches = list(train_batches), list(query_batches)
    final = query_model if query_model is not None else checkpoints[-1]
    at_final = resolve_modules(final, modules)
    names = list(at_final)
    q = example_gradients(BatchSource(final, query_batches, loss_fn, at_final, include_bias, progress))
    total: torch.Tensor | None = None
    carried: dict[str, torch.Tensor] | None = None
    for model, lrs, pre in reversed(list(zip(checkpoints, learning_rates, pres))):
        tracked = resolve_modules(model, names)
        factors = fit_ekfac(
            model, train_batches, fisher_loss_fn or loss_fn, modules=tracked, include_bias=include_bias,
            progress=progress, scales=pre,
        )  # fmt: skip
        curvature = Curvature(
            factors.eigen,
            factors.corrected,
            lrs,
            pre,
            weight_decay,
            decoupled_weight_decay,
            momentum,
            momentum_gain,
        )
        products, q, carried = unroll_segment(
            q, curvature, damping, damping_mode, unroll, scale, momentum_queries=carried
        )
        queries = Factors(
            {n: {"ihvp": t} for n, t in products.items()}, {"queries": len(next(iter(q.values())))}
        )
        train = BatchSource(model, train_batches, loss_fn, tracked, include_bias, progress)
        part = torch.from_numpy(sum(score_modules(train, queries, torch.float64).values()))  # type: ignore[arg-type]
        total = part if total is None else total + part
    assert total is not None
    return total
