"""Attribution methods for a custom model and loss, from Python (no tokenizer, no store).

Each function composes the library's own pieces on the vectors of
:func:`~bergson.per_example_gradients` or on the layer taps of
:func:`~bergson.collect.generic.tap_batches`:

* :func:`gradient_scores`: gradient inner products or cosines, optionally with a
  preconditioner H (H⁻¹ between the sides, or H^{-1/2} on each side for cosines), exactly as
  ``bergson score`` plans them (:func:`~bergson.transforms.preconditioners.plan_powers`).
  Optimizer normalization is chosen when collecting (``normalizers=``).
* :func:`fit_second_moment` and :func:`trackstar_scores`: TrackStar's mixed train/query
  second moment (:func:`~bergson.mix_preconditioners`), applied as H^{-1/2} on both sides,
  then cosines.
* :func:`fit_ekfac` and :func:`ekfac_scores`: EK-FAC influence for the ``nn.Linear`` layers
  of the model, with the covariance, eigenvalue-correction and inverse-Fisher-vector math of
  :mod:`bergson.transforms.ekfac` and :mod:`bergson.methods.ekfac`.

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

from ..collect.generic import ExampleGradients, LossFn, tap_batches
from ..errors import BergsonError
from ..models import find_tracked_modules
from ..store.scores import unit_rows
from ..transforms.ekfac import Factors, add_corrections, add_covariances, eigendecompose
from ..transforms.preconditioners import (
    Preconditioner,
    StatisticsSink,
    mix_preconditioners,
    plan_powers,
)
from .ekfac import per_document_gradients, precondition_queries, query_products


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


def _resolve(
    model: nn.Module, modules: Mapping[str, nn.Module] | Sequence[str] | None
) -> dict[str, nn.Module]:
    if modules is None:
        return find_tracked_modules(model)
    if isinstance(modules, Mapping):
        return dict(modules)
    named = dict(model.named_modules())
    missing = [m for m in modules if m not in named]
    if missing:
        raise BergsonError(f"modules: no module named {missing[0]!r} in the model")
    return {m: named[m] for m in modules}


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).double()


def fit_ekfac(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossFn,
    *,
    modules: Mapping[str, nn.Module] | Sequence[str] | None = None,
    include_bias: bool = False,
    progress: bool = True,
) -> EkfacFactors:
    """EK-FAC factors from two passes over ``batches`` (float64 sums).

    ``loss_fn`` defines the Fisher: pass the model's loss with labels sampled from its own
    predictions for the true Fisher, or with the dataset's labels for the empirical Fisher.
    A = (1/T) Σ x xᵀ over the T positions (T = N for inputs without a sequence axis),
    S = (1/N) Σ g gᵀ, and Λ = (1/N) Σ_n (Q_Sᵀ G_n Q_A)²."""
    tracked = _resolve(model, modules)
    batches = list(batches)
    sums: dict[str, dict[str, torch.Tensor]] = {}
    positions: dict[str, int] = {}

    def covariances(name: str, x: torch.Tensor, g: torch.Tensor) -> None:
        add_covariances(sums, name, _flat(x), _flat(g))
        positions[name] = positions.get(name, 0) + x.shape[0] * x.shape[1]

    n = tap_batches(
        model, batches, loss_fn, tracked, covariances, include_bias=include_bias, desc="covariances",
        progress=progress,
    )  # fmt: skip
    if n == 0:
        raise BergsonError("batches is empty: the Fisher is undefined")
    eigen = eigendecompose(
        Factors({k: {"A": d["A"] / positions[k], "S": d["S"] / n} for k, d in sums.items()})
    )
    bases = {k: (d["S_eigenvectors"], d["A_eigenvectors"]) for k, d in eigen.tensors.items()}
    corrections: dict[str, torch.Tensor] = {}

    def correct(name: str, x: torch.Tensor, g: torch.Tensor) -> None:
        add_corrections(corrections, name, bases[name], per_document_gradients(x.double(), g.double()))

    tap_batches(
        model, batches, loss_fn, tracked, correct, include_bias=include_bias, desc="eigenvalue correction",
        progress=progress,
    )  # fmt: skip
    corrected = Factors({k: {"eigenvalues": s / n} for k, s in corrections.items()})
    return EkfacFactors(tracked, eigen, corrected, include_bias)


def _gradients(
    model: nn.Module, batches: Iterable[Any], loss_fn: LossFn, factors: EkfacFactors, progress: bool
) -> dict[str, torch.Tensor]:
    """Per-example gradients [N, out, in] of every tracked layer (float64)."""
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in factors.modules}

    def keep(name: str, x: torch.Tensor, g: torch.Tensor) -> None:
        parts[name].append(per_document_gradients(x.double(), g.double()).cpu())

    tap_batches(
        model, batches, loss_fn, factors.modules, keep, include_bias=factors.include_bias,
        desc="query gradients", progress=progress,
    )  # fmt: skip
    return {k: torch.cat(v) for k, v in parts.items()}


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
) -> torch.Tensor:
    """Influence scores [N, Q] = Σ_modules ⟨(F + δI)⁻¹ G_q, G_n⟩ of every training example n
    on every query q, both gradients of ``loss_fn`` (with the dataset's labels)."""
    grads = _gradients(model, query_batches, loss_fn, factors, progress)
    queries = precondition_queries(grads, factors.eigen, factors.corrected, damping, damping_mode)
    products = {k: query_products(queries, k) for k in factors.modules}
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in factors.modules}

    def score(name: str, x: torch.Tensor, g: torch.Tensor) -> None:
        p = products[name].to(x.device)
        parts[name].append(
            torch.einsum("boi,qoi->bq", per_document_gradients(x.double(), g.double()), p).cpu()
        )

    tap_batches(
        model, train_batches, loss_fn, factors.modules, score, include_bias=factors.include_bias,
        desc="scores", progress=progress,
    )  # fmt: skip
    per_module = [torch.cat(v) for v in parts.values()]
    return torch.stack(per_module).sum(0)
