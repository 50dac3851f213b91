"""Iterative inverse-Fisher-vector products: LiSSA, ASTRA and preconditioned CG on EK-FAC's Fisher.

EK-FAC answers v = (F + δI)⁻¹ g_q with its approximation F ≈ Q diag(Λ) Qᵀ of the Fisher
G = (1/N) Σ_n vec(G_n) vec(G_n)ᵀ, per module (block-diagonal over the tracked modules, like
EK-FAC itself), where G_n is document n's gradient under the Fisher's labels (sampled from the
model, seeded per document, for the true Fisher; the dataset's tokens with --fisher empirical)
and δ is EK-FAC's damping of that module. The two methods here solve (G + δI) v = g with G
itself, by stochastic Neumann (Richardson) iterations from v_0 = 0, r_k = g - (G + δI) v_k:

* LiSSA (Agarwal, Bullins and Hazan 2017): v_{k+1} = v_k + α_k r_k.
* ASTRA (Wang et al. 2025): the same iteration preconditioned by EK-FAC,
  v_{k+1} = v_k + s_k P r_k with P = (EK-FAC + δI)⁻¹ and s_0 = 1, so that one step from
  v_0 = 0 is EK-FAC's answer exactly. P already captures most of the curvature, so the
  condition number the iteration sees is far smaller than LiSSA's, and so is the number of
  steps to a given accuracy.
* PCG (preconditioned conjugate gradients, Hestenes and Stiefel 1952) with the same P: the
  direction d_k = P r_k + β_k d_{k-1}, β_k = ⟨r_k, P r_k⟩ / ⟨r_{k-1}, P r_{k-1}⟩, is made conjugate
  to the earlier ones, and its length comes from the line search below. On a fixed operator (a
  full batch) the k-th iterate minimises the error over the whole Krylov space of P(G + δI) the
  first k products span, so it needs at most as many steps as ASTRA's steepest descent (and in
  exact arithmetic no more than the number of distinct eigenvalues of P(G + δI)). The first step
  is EK-FAC's answer rescaled by the line search. A fresh batch at each step would break the
  conjugacy, so PCG takes every document (--ihvp_batch_size 0) and its own step lengths.

Step lengths (``step_size``): 0 (the default) chooses each step's length by an exact line search
on the quadratic ½ vᵀ(G_B + δI)v - gᵀv along the step's direction d (s = ⟨r, d⟩ / ⟨d, (G_B + δI) d⟩,
per module and query: preconditioned steepest descent), which never increases the error in the (G_B + δI)-norm on a
full batch. A fixed step is the textbook Neumann iteration: ASTRA s_k = ``step_size`` (after the
first), LiSSA α = ``step_size`` / (λ_max + δ) per module with λ_max EK-FAC's (or K-FAC's) largest
eigenvalue. A fixed iteration contracts only when the step is below 2 / λ_max of the operator
it sees, which EK-FAC's eigenvalues (the diagonal of Qᵀ G Q) can underestimate several-fold
(λ_max(P (G + δI)) is about 3 on a toy transformer with 120 documents and in the hundreds with 12
documents, where G is low-rank): a diverging iteration is detected (the residual passes 1000
times the query gradient's norm) and refused with a message, never turned into NaN scores.

G_B v = (1/|B|) Σ_{n ∈ B} ⟨G_n, v⟩ G_n is computed over a batch B of training examples per step
(``batch_size`` of them, drawn without replacement by a generator seeded with ``seed``; 0: all
of them, the exact product), with the per-document gradients of the EK-FAC passes
(:func:`~bergson.methods.ekfac.passes.per_document_gradients`): one pass over B per step (the
residual is updated with it, r_{k+1} = r_k - s_k (G_B + δI) d_k; exact on a full batch), none
for a single ASTRA step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ...collect.engine import LossFn
from ...data import TokenizedDocs
from ...errors import BergsonError
from ...transforms.ekfac import Factors, damping_value, flat_inner, ihvp, kfac_eigenvalues
from .passes import BatchSource, DocumentSource, EkfacOptions, Source, per_document_gradients

logger = logging.getLogger(__name__)

IHVP_METHODS = ("ekfac", "astra", "lissa", "pcg")
DIVERGED = 1e3
"""A residual this many times the query gradient's norm means the iteration diverges."""

Products = Callable[[int, Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]
"""``products(step, v)``: G_B v per module for step ``step``'s batch B."""


@dataclass
class IhvpOptions:
    """Which iHVP answers (F + δI)⁻¹ g_q, and how its iterations run (see the module docstring)."""

    method: str = "ekfac"
    steps: int = 10
    batch_size: int = 0
    step_size: float = 0.0
    seed: int = 0

    def check(self) -> None:
        if self.method not in IHVP_METHODS:
            raise BergsonError(f"--ihvp {self.method!r}: choose one of {', '.join(IHVP_METHODS)}")
        if self.steps < 1:
            raise BergsonError(f"--ihvp_steps {self.steps}: must be >= 1 (the number of iterations)")
        if self.batch_size < 0:
            raise BergsonError(f"--ihvp_batch_size {self.batch_size}: must be >= 0 (0: every document)")
        if not (math.isfinite(self.step_size) and self.step_size >= 0):
            raise BergsonError(
                f"--ihvp_step_size {self.step_size}: must be a finite number >= 0 (0: each step's length "
                "chosen by a line search)"
            )
        if self.method == "pcg" and (self.step_size > 0 or self.batch_size > 0 or self.seed != 0):
            raise BergsonError(
                "--ihvp pcg with --ihvp_step_size, --ihvp_batch_size or --ihvp_seed: conjugate gradients "
                "choose each step's length themselves and need the same Fisher at every step (a batch drawn "
                "afresh breaks the conjugacy their convergence rests on), so they take every document; drop "
                "those options, or use --ihvp astra for fixed steps or drawn batches"
            )
        if self.method == "ekfac" and self != IhvpOptions():
            raise BergsonError(
                "--ihvp_steps, --ihvp_batch_size, --ihvp_step_size and --ihvp_seed set the iterations of "
                "--ihvp astra or lissa; --ihvp ekfac (the default) has none: drop them or choose astra or lissa"
            )

    def record(self) -> dict[str, Any]:
        if self.method == "ekfac":
            return {"ihvp": "ekfac"}
        return {
            "ihvp": self.method,
            "ihvp_steps": self.steps,
            "ihvp_batch_size": self.batch_size,
            "ihvp_step_size": self.step_size,
            "ihvp_seed": self.seed,
        }


def fisher_products(source: Source, vectors: Mapping[str, torch.Tensor], dtype: torch.dtype, labels: str):
    """Σ_n ⟨G_n, v_q⟩ G_n [nq, out, in] per module over the examples of one pass of ``source``
    (under the Fisher's ``labels``), and the number of examples seen."""
    sums: dict[str, torch.Tensor] = {}
    cache: dict[str, torch.Tensor] = {}

    def fn(name: str, x: torch.Tensor, g: torch.Tensor, rows: np.ndarray, mask: torch.Tensor | None) -> None:
        if name not in vectors:
            return
        if name not in cache:
            cache[name] = vectors[name].to(x.device, dtype)
        grads = per_document_gradients(x.to(dtype), g.to(dtype))  # [B, out, in]
        part = torch.einsum("bq,boi->qoi", flat_inner(grads, cache[name]), grads)
        sums[name] = sums[name] + part if name in sums else part

    seen = source.run("fisher-vector products", fn, labels)
    out = {name: sums[name].to(v) if name in sums else torch.zeros_like(v) for name, v in vectors.items()}
    return out, seen


def document_products(
    model: nn.Module, docs: TokenizedDocs, opts: EkfacOptions, batch_size: int, seed: int, dtype: torch.dtype
) -> Products:
    """G_B v over documents (``bergson ekfac``): B is ``batch_size`` documents with a loss token,
    drawn afresh each step (0: all of them), under EK-FAC's Fisher labels (``opts.fisher``)."""
    active = np.flatnonzero(docs.num_loss_tokens() > 0)
    if len(active) == 0:
        raise BergsonError("no document has a loss token: the Fisher is undefined")
    gen = np.random.default_rng(seed)

    def products(step: int, v: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        take = active
        if 0 < batch_size < len(active):
            take = np.sort(gen.choice(active, batch_size, replace=False))
        sums, _ = fisher_products(DocumentSource(model, docs, opts, take), v, dtype, opts.fisher)
        return {name: s / (len(take) * opts.draws(opts.fisher)) for name, s in sums.items()}

    return products


def batch_products(
    model: nn.Module,
    batches: Sequence[Any],
    loss_fn: LossFn,
    modules: Mapping[str, nn.Module],
    include_bias: bool,
    batch_size: int,
    seed: int,
) -> Products:
    """G_B v over a custom model's batches (the loss defines the Fisher): B is ``batch_size`` of
    the batches, drawn afresh each step (0: all of them); the mean is over their examples."""
    if not batches:
        raise BergsonError("batches is empty: the Fisher is undefined")
    gen = np.random.default_rng(seed)

    def products(step: int, v: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        chosen = list(batches)
        if 0 < batch_size < len(batches):
            chosen = [batches[i] for i in sorted(gen.choice(len(batches), batch_size, replace=False))]
        source = BatchSource(model, chosen, loss_fn, modules, include_bias, progress=False)
        sums, seen = fisher_products(source, v, torch.float64, "empirical")
        return {name: s / max(seen, 1) for name, s in sums.items()}

    return products


def solve(
    grads: Mapping[str, torch.Tensor],
    eigen: Factors,
    corrected: Factors | None,
    damping: float,
    damping_mode: str,
    opts: IhvpOptions,
    products: Products,
    dtype: torch.dtype = torch.float64,
    observe: Callable[[int, Mapping[str, torch.Tensor]], None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(G + δI)⁻¹ g_q per module by ``opts.method`` (see the module docstring), and what to record:
    the options and the relative residual ‖g - (G_B + δI) v_k‖ / ‖g‖ before each step k.
    ``observe(k, v_{k+1})`` is called after each step (for convergence studies)."""
    opts.check()
    lams = {
        name: corrected.tensors[name]["eigenvalues"]
        if corrected is not None
        else kfac_eigenvalues(eigen, name)
        for name in grads
    }
    g = {name: t.to(dtype) for name, t in grads.items()}
    pre = {name: ihvp(eigen, lams[name], name, g[name], damping, damping_mode) for name in g}
    if opts.method == "ekfac":
        return pre, opts.record()
    # modules without curvature (an expert no training token reached) keep EK-FAC's zero answer
    live = [
        name for name in g if bool((lams[name] > 0).any()) or (damping_mode == "absolute" and damping > 0)
    ]
    delta = {name: damping_value(lams[name], damping, damping_mode) for name in live}
    alpha = {name: opts.step_size / (float(lams[name].max()) + delta[name]) for name in live}
    v = {name: torch.zeros_like(t) for name, t in g.items()}
    r = {name: g[name].clone() for name in live}  # g - (G + δI) v, updated with each step's product
    norm = math.sqrt(sum(float(g[name].square().sum()) for name in live)) or 1.0
    residuals: list[float] = []
    direction: dict[str, torch.Tensor] = {}  # pcg: the last direction and ⟨r, P r⟩ per query
    rz: dict[str, torch.Tensor] = {}
    for step in range(opts.steps):
        rel = math.sqrt(sum(float(t.square().sum()) for t in r.values())) / norm
        residuals.append(rel)
        if not math.isfinite(rel) or rel > DIVERGED:
            raise BergsonError(
                f"--ihvp {opts.method}: the iteration diverges (residual {rel:.3g} times the query "
                f"gradient's at step {step}); lower --ihvp_step_size (now {opts.step_size}; 0 chooses each "
                "step's length itself) or raise --damping"
            )
        if opts.method in ("astra", "pcg"):
            p = {name: ihvp(eigen, lams[name], name, r[name], damping, damping_mode) for name in live}
        else:
            p = r
        if opts.method == "pcg":
            p = _conjugate(p, r, direction, rz)
        fixed = opts.step_size > 0 or (opts.method == "astra" and step == 0)
        last = step == opts.steps - 1
        ap = None
        if not (fixed and last):
            gp = products(step, p)
            ap = {name: gp[name].to(p[name]) + delta[name] * p[name] for name in live}
        for name in live:
            if opts.method == "astra" and step == 0:
                size: torch.Tensor | float = 1.0  # EK-FAC's answer
            elif opts.step_size > 0:
                size = opts.step_size if opts.method == "astra" else alpha[name]
            else:  # the length minimising the (batch's) quadratic along p, per query
                assert ap is not None
                dims = tuple(range(1, p[name].dim()))
                num = (r[name] * p[name]).sum(dims)
                den = (p[name] * ap[name]).sum(dims)
                size = torch.where(den > 0, num / den.clamp(min=torch.finfo(den.dtype).tiny), 0.0)
                size = size.reshape(-1, *([1] * len(dims)))
            v[name] = v[name] + size * p[name]
            if ap is not None:
                r[name] = r[name] - size * ap[name]
        if observe is not None:
            observe(step, v)
        logger.info("--ihvp %s step %d: relative residual %.3g", opts.method, step, rel)
    return v, {**opts.record(), "ihvp_residuals": residuals}


def _conjugate(
    z: dict[str, torch.Tensor],
    r: Mapping[str, torch.Tensor],
    direction: dict[str, torch.Tensor],
    rz: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """PCG's next directions d = z + β d_prev per module and query, z = P r the preconditioned
    residual, β = ⟨r, z⟩ / ⟨r_prev, z_prev⟩ (0 at the first step); updates ``direction`` and
    ``rz`` (the previous step's) in place."""
    for name, zn in z.items():
        dims = tuple(range(1, zn.dim()))
        now = (r[name] * zn).sum(dims)
        if name in direction:
            before = rz[name]
            beta = torch.where(before > 0, now / before.clamp(min=torch.finfo(before.dtype).tiny), 0.0)
            zn = zn + beta.reshape(-1, *([1] * len(dims))) * direction[name]
        direction[name], rz[name] = zn, now
    return {name: direction[name] for name in z}
