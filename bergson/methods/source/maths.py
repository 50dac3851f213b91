"""SOURCE's maths: a query gradient unrolled backwards through segments of training.

Training by gradient steps θ_{k+1} = θ_k - η_k ∇J(θ_k). Adding ε times document m's loss to the
objective and linearising in ε, the response δ_k = dθ_k/dε follows

    δ_{k+1} = (I - η_k H_k) δ_k - η_k g_m(θ_k).

Within segment l (the steps a checkpoint stands for) take H_k = H_l and g_m(θ_k) = g_{m,l}, the
checkpoint's curvature and the document's gradient there. Summing the segment's steps,

    δ_end = S_l δ_start - R_l g_{m,l},   S_l = s_l(H_l),   R_l = r_l(H_l) = (I - S_l) H_l⁻¹,

with s_l(λ) = Π_k (1 - η_k λ) ("discrete", exact for gradient descent on a quadratic) or
exp(-λ Σ_k η_k) ("exp", the SOURCE paper's continuous-time form), and r_l(λ) = (1 - s_l(λ)) / λ,
which tends to Σ_k η_k as λ → 0. Hence δ_T = -Σ_l S_L ⋯ S_{l+1} R_l g_{m,l}, and the score of
document m for a query loss f (positive: training on m lowers f) is

    -∇f(θ_T) · δ_T = Σ_l ⟨R_l q_l, g_{m,l}⟩,   q_L = ∇f(θ_T),   q_{l-1} = S_l q_l,

since S_l and R_l are symmetric. Every H_l is an EK-FAC (or K-FAC) approximation Q diag(λ) Qᵀ with
Q = Q_S ⊗ Q_A, so S_l and R_l act on a module's gradient G (out x in) as
Q_S [(Q_Sᵀ G Q_A) ⊙ f(λ + δ)] Q_Aᵀ, the same rotation EK-FAC's inverse uses with 1 / (λ + δ).
One segment with Σ η → ∞ gives r → 1 / (λ + δ): EK-FAC's damped influence.

Adam (``--step_model adam``) steps η_k D ∇J with D = diag(1 / (sqrt(v̂) + eps)). With D = D_l frozen
within segment l (no momentum) and C_l = D_l^{1/2}, δ = C_l u turns the segment into gradient descent
on u with H̃_l = C_l H_l C_l and gradients C_l g: the formulas above apply to q̃_l = C_l q_l, with
H̃_l's eigenbasis and eigenvalues. The score's term is ⟨R̃_l q̃_l, C_l g_{m,l}⟩ = ⟨C_l R̃_l q̃_l,
g_{m,l}⟩, and the cotangent handed to segment l - 1 is C_l⁻¹ S̃_l q̃_l in the plain coordinates
(elementwise: C is diagonal), so the next segment multiplies it by its own C.

Weight decay W (elementwise, per parameter) adds a term to the step's linear part. Decoupled (AdamW,
and any decay of plain gradient descent): θ_{k+1} = θ_k - η_k (W θ_k + D ∇J), so the response's
curvature is H̃ + W in the u coordinates (W commutes with C). Coupled (Adam's L2, whose gradient Adam
also preconditions): D (H + W), i.e. H̃ + W D. Either diagonal term E is added to the eigenvalues as its
diagonal in the segment's Kronecker eigenbasis, (Q_S²)ᵀ E (Q_A²) (Q² elementwise): exact for a uniform
decoupled W (each column of Q has unit norm) or when E is a Kronecker product of matrices diagonal in
the bases, the same approximation EK-FAC makes of the curvature itself otherwise. The damping is taken
relative to the curvature's eigenvalues before the decay is added.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import BergsonError
from ...transforms.ekfac import Factors, damping_value, kfac_eigenvalues
from ...transforms.normalizers import AdamNormalizer

UNROLLS = ("exp", "discrete")


@dataclass
class Curvature:
    """One segment's curvature and schedule: the eigenbases (``eigen``, EK-FAC's eigen stage), the
    eigenvalues per module (out x in; EK-FAC's corrected ones, or None for K-FAC's products) and
    the learning rate of each of the segment's steps."""

    eigen: Factors
    eigenvalues: Mapping[str, torch.Tensor] | Factors | None
    """Per module [out, in]; a :class:`Factors` of EK-FAC's ``corrected`` stage is read as such."""
    lrs: Sequence[float]
    preconditioner: Mapping[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] | None = None
    """C = D^{1/2} per module for an Adam-like step η D ∇J (None: plain gradient descent): a positive
    [out, in] tensor, or the pair (c_out [out], c_in [in]) of a rank-one C = c_out c_inᵀ. The eigenbases
    and eigenvalues are then those of C H C (EK-FAC fitted on C ⊙ G)."""
    weight_decay: float | Mapping[str, float | torch.Tensor] = 0.0
    """The decay rate W of the segment's steps: one number, or per module a number or an [out, in]
    tensor (a tracked bias column may decay at another rate than the weight)."""
    decoupled_weight_decay: bool = True
    """True: θ -= η W θ beside the step (AdamW; the same as coupled for plain gradient descent without
    momentum). False: W θ joins the gradient and is preconditioned with it (Adam's L2) and, with
    momentum, averaged with it (SGD's weight decay)."""
    momentum: float = 0.0
    """β of a momentum buffer the steps follow, ν ← β ν + ``momentum_gain`` ∇J and θ -= η D ν (0: none;
    modelled with the discrete unroll only). Adam's first moment is ν with gain 1 - β₁; its bias
    correction 1 / (1 - β₁ᵏ) belongs in the learning rates."""
    momentum_gain: float = 1.0
    """The weight of the new gradient in the buffer: 1 - β₁ for Adam's average, 1 for SGD's momentum."""


def adam_step_preconditioner(norm: AdamNormalizer) -> tuple[torch.Tensor, torch.Tensor]:
    """C = D^{1/2} of Adam's step D = 1 / (sqrt(v̂) + eps) for one module's elementwise second moments
    (``norm.weight`` [out, in], ``norm.bias`` [out] or None), as the pair (c_out [out], c_in [in, plus
    the bias column]) of a rank-one C: the row-sum / column-sum fit of (sqrt(v̂) + eps)², exact where
    that is rank one (a uniform v̂ included)."""

    def denominator(v: torch.Tensor) -> torch.Tensor:
        return (v.double().clamp(min=0).sqrt() + norm.eps) ** 2

    bias = None if norm.bias is None else denominator(norm.bias)
    a, b = AdamNormalizer(denominator(norm.weight), bias).to_adafactor().scales(bias is not None)
    return a.double().sqrt(), b.double().sqrt()


def _preconditioner(curvature: Curvature, name: str) -> torch.Tensor | None:
    if curvature.preconditioner is None:
        return None
    c = curvature.preconditioner.get(name)
    if c is None:
        raise BergsonError(f"the preconditioner has no entry for module {name!r}")
    if isinstance(c, tuple):
        c = torch.outer(c[0].double(), c[1].double())
    c = c.double()
    if not bool((c > 0).all()):
        raise BergsonError(f"the preconditioner of module {name!r} must be positive everywhere")
    return c


def _decay(curvature: Curvature, name: str) -> float | torch.Tensor:
    wd = curvature.weight_decay
    value = wd.get(name, 0.0) if isinstance(wd, Mapping) else wd
    if isinstance(value, torch.Tensor):
        value = value.double()
        if bool((value < 0).any()):
            raise BergsonError(f"the weight decay of module {name!r} must be >= 0")
    elif not value >= 0:
        raise BergsonError(f"weight decay {value}: must be >= 0")
    return value


def decay_shift(
    qs: torch.Tensor, qa: torch.Tensor, decay: float | torch.Tensor, c: torch.Tensor | None, decoupled: bool
) -> torch.Tensor | float:
    """What weight decay adds to a module's eigenvalues in the Kronecker eigenbasis Q_S ⊗ Q_A: the
    diagonal (Q_S²)ᵀ E (Q_A²) of E = W (decoupled, or plain gradient descent) or W ⊙ C² (coupled)."""
    if c is None or decoupled:
        if not isinstance(decay, torch.Tensor):
            return float(decay)  # uniform: exactly W in any orthonormal basis
        e = decay.expand(qs.shape[0], qa.shape[0])
    else:
        e = decay * c**2
    return (qs**2).T @ e @ (qa**2)


def _lr_counts(lrs: Sequence[float], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct learning rates of a segment and how many steps use each."""
    values, counts = torch.unique(torch.as_tensor(list(lrs), dtype=torch.float64), return_counts=True)
    return values.to(like), counts.to(like)


def step_functions(lam: torch.Tensor, lrs: Sequence[float], unroll: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(s(λ), r(λ)) elementwise for eigenvalues ``lam`` (>= 0, damping included) over the steps of
    one segment with learning rates ``lrs``: s the factor a segment applies to a perturbation,
    r = (1 - s) / λ (Σ η where λ = 0) the weight it gives a gradient taken in the segment."""
    if unroll not in UNROLLS:
        raise BergsonError(f"--unroll {unroll!r}: choose exp or discrete")
    if any(not eta >= 0 for eta in lrs):
        raise BergsonError("--segment_learning_rates: learning rates must be >= 0")
    total = float(sum(lrs))
    if not lrs:
        return torch.ones_like(lam), torch.zeros_like(lam)
    if unroll == "exp":
        exponent = -lam * total
        s, one_minus_s = torch.exp(exponent), -torch.expm1(exponent)
    else:
        values, counts = _lr_counts(lrs, lam)
        factors = 1 - values[:, None] * lam.reshape(1, -1)  # [distinct lrs, eigenvalues]
        stable = bool((factors > 0).all())
        if stable:  # log-space keeps 1 - s accurate when every η λ is small
            exponent = (counts[:, None] * torch.log1p(-values[:, None] * lam.reshape(1, -1))).sum(0)
            s, one_minus_s = torch.exp(exponent), -torch.expm1(exponent)
        else:  # some η λ >= 1: the steps overshoot (and the sign of s can flip)
            s = (factors ** counts[:, None]).prod(0)
            one_minus_s = 1 - s
        s, one_minus_s = s.reshape(lam.shape), one_minus_s.reshape(lam.shape)
    safe = torch.where(lam > 0, lam, torch.ones_like(lam))
    r = torch.where(lam > 0, one_minus_s / safe, torch.full_like(lam, total))
    return s, r


def _eigenvalues(curvature: Curvature, name: str) -> torch.Tensor:
    if isinstance(curvature.eigenvalues, Factors):
        return curvature.eigenvalues.tensors[name]["eigenvalues"].double()
    if curvature.eigenvalues is not None:
        return curvature.eigenvalues[name].double()
    return kfac_eigenvalues(curvature.eigen, name).double()


def momentum_steps(
    lam: torch.Tensor,
    outside: torch.Tensor | float,
    lrs: Sequence[float],
    beta: float,
    gain: float,
    cd: torch.Tensor,
    cm: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The discrete unroll of a segment with a momentum buffer, elementwise in the eigenbasis.

    Per eigenvalue λ the perturbation of (parameters, buffer) follows z_{k+1} = M_k z_k + b_k g with
    M_k = [[1 - η_k w - η_k a λ, -η_k β], [a λ, β]] and b_k = (-η_k a, a) (a the gain, w a decay
    outside the buffer). From the cotangents (``cd``, ``cm``) at the segment's end this returns
    the weight the segment gives a document's gradient, Σ_k (η_k a c_δ - a c_ν) at the cotangent
    after step k, and the cotangents at the segment's start (Mᵀ applied step by step, last first)."""
    if any(not eta >= 0 for eta in lrs):
        raise BergsonError("--segment_learning_rates: learning rates must be >= 0")
    weight = torch.zeros_like(cd)
    for eta in reversed(lrs):
        weight += gain * (eta * cd - cm)
        cd, cm = (1 - eta * outside - eta * gain * lam) * cd + gain * lam * cm, beta * (cm - eta * cd)
    return weight, cd, cm


def unroll_segment(
    queries: Mapping[str, torch.Tensor],
    curvature: Curvature | tuple[Any, ...],
    damping: float = 0.1,
    damping_mode: str = "relative",
    unroll: str = "exp",
    scale: float = 1.0,
    momentum_queries: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """One segment of :func:`unrolled_queries`: (R q, S q) per module for the queries q handed to
    the segment (per module [nq, out, in]), in float64; with a preconditioner C, (C R̃ (C q),
    C⁻¹ S̃ (C q)). ``curvature`` is a :class:`Curvature` or the tuple (eigen, eigenvalues, lrs[,
    preconditioner]).

    The third value is the cotangent of the momentum buffer handed to the segment before (None
    while no momentum is modelled); ``momentum_queries`` is the one this segment receives (None:
    zero). With momentum the parameters' and the buffer's cotangents are unrolled together
    (:func:`momentum_steps`; the buffer lives in gradient coordinates, C ν in the segment's)."""
    if not scale > 0:
        raise BergsonError(f"--curvature_scale {scale}: must be > 0")
    if not isinstance(curvature, Curvature):
        curvature = Curvature(*curvature)
    beta = float(curvature.momentum)
    if not 0 <= beta < 1 or not curvature.momentum_gain > 0:
        raise BergsonError(
            f"momentum {beta} with gain {curvature.momentum_gain}: the momentum must be in [0, 1) and its gain > 0"
        )
    carried = beta > 0 or momentum_queries is not None
    if carried and unroll != "discrete":
        raise BergsonError(f"--unroll {unroll}: momentum is modelled with the discrete unroll only")
    products: dict[str, torch.Tensor] = {}
    handed: dict[str, torch.Tensor] = {}
    handed_m: dict[str, torch.Tensor] = {}
    for name, g in queries.items():
        d = curvature.eigen.tensors[name]
        qs, qa = d["S_eigenvectors"].double(), d["A_eigenvectors"].double()
        lam = scale * _eigenvalues(curvature, name)
        c = _preconditioner(curvature, name)
        decay = _decay(curvature, name)
        # with momentum a decoupled decay acts beside the buffer, a coupled one inside it
        outside = carried and curvature.decoupled_weight_decay
        shift = decay_shift(qs, qa, decay, c, curvature.decoupled_weight_decay)
        lam = (lam + damping_value(lam, damping, damping_mode)).clamp(min=0) + (0.0 if outside else shift)
        q = g.double() if c is None else g.double() * c
        rotated = qs.T @ q @ qa
        if carried:
            m = None if momentum_queries is None else momentum_queries.get(name)
            m = torch.zeros_like(q) if m is None else (m.double() if c is None else m.double() / c)
            weight, cd, cm = momentum_steps(
                lam,
                shift if outside else 0.0,
                curvature.lrs,
                beta,
                curvature.momentum_gain,
                rotated,
                qs.T @ m @ qa,
            )
            products[name] = qs @ weight @ qa.T
            handed[name] = qs @ cd @ qa.T
            handed_m[name] = qs @ cm @ qa.T
            if c is not None:
                handed_m[name] = handed_m[name] * c
        else:
            s, r = step_functions(lam, curvature.lrs, unroll)
            products[name] = qs @ (rotated * r) @ qa.T
            handed[name] = qs @ (rotated * s) @ qa.T
        if c is not None:
            products[name] = products[name] * c
            handed[name] = handed[name] / c
    return products, handed, (handed_m if carried else None)


def unrolled_queries(
    query_grads: Mapping[str, torch.Tensor],
    segments: Sequence[Curvature | tuple[Any, ...]],
    damping: float = 0.1,
    damping_mode: str = "relative",
    unroll: str = "exp",
    scale: float = 1.0,
) -> list[dict[str, torch.Tensor]]:
    """SOURCE's preconditioned queries, one dict per segment (training order): module -> R_l q_l
    [nq, out, in], with q_L = ``query_grads`` (the query gradients at the final parameters, per
    module [nq, out, in]) and q_{l-1} = S_l q_l. A training document's score is Σ_l ⟨R_l q_l, G_{n,l}⟩
    with G_{n,l} its gradient at checkpoint l.

    A segment with a ``preconditioner`` C (Adam's D^{1/2}, see the module docstring) has the curvature
    C H C, and its product is C R̃ C q: documents are still scored with their plain gradients.

    A segment with ``momentum`` unrolls the parameters and the momentum buffer together and hands both
    cotangents on (see :func:`momentum_steps`).

    Each segment's curvature is ``scale`` x its eigenvalues plus the damping δ (``damping`` itself,
    or times the mean of the scaled eigenvalues per module with ``damping_mode`` relative). All
    arithmetic is float64."""
    if not segments:
        raise BergsonError("SOURCE needs at least one segment (checkpoint)")
    q = dict(query_grads)
    m: dict[str, torch.Tensor] | None = None
    out: list[dict[str, torch.Tensor]] = [{} for _ in segments]
    for index in reversed(range(len(segments))):
        out[index], q, m = unroll_segment(q, segments[index], damping, damping_mode, unroll, scale, m)
    return out
