"""K-FAC whitening of per-example gradients, from the eigenbases of an EK-FAC fit (``--whitening``).

K-FAC approximates a linear layer's Fisher by S ⊗ A (:mod:`bergson.transforms.ekfac`), so with
damped factors S_λ = S + λ_S I and A_λ = A + λ_A I its inverse square root maps a gradient G
(out × in, row-major) to S_λ^-1/2 G A_λ^-1/2. A store of such vectors turns every dot product
into a K-FAC influence score, ⟨S_λ^-1/2 Q A_λ^-1/2, S_λ^-1/2 G A_λ^-1/2⟩ = ⟨Q, S_λ^-1 G A_λ^-1⟩,
and a random projection of it stays an unbiased estimate of that score. Preconditioning only
the query (``bergson ekfac --projected_queries``) estimates the same kind of score with a far
larger variance: H^-1 q is dominated by the low-curvature directions where training gradients
are small, so ⟨P H^-1 q, P g⟩ is mostly projection noise. Splitting H^-1 into a square root per
side keeps both vectors of the same scale, which is why a whitened projected store is the
cheap first stage that agrees with EK-FAC (``benchmarks/cascade.py``).

Damping, relative like EK-FAC's: each factor gets √δ times the mean of its eigenvalues, so the
product of the two damped factors is S ⊗ A plus δ·mean(λ_S)·mean(λ_A) and the cross terms
√δ (λ_S mean(λ_A) + mean(λ_S) λ_A), which damp more than EK-FAC's δ·mean(Λ) where one factor is
large; δ = 0.01 (the default) agrees best with EK-FAC at its own default 0.1 (Pearson 0.99 against
0.97 for δ = 0.1, unprojected, on the cascade benchmark's 1,500 documents). Absolute damping adds
√δ to each. Both factors' eigenbases come from the fit's ``eigen/`` stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import BergsonError
from .ekfac import FLOAT32_EIGH_WIDTH, Factors
from .normalizers import WHITENING_DAMPING, KfacWhitening

EIGEN_STAGE = "eigen"


def _inverse_sqrt(
    values: torch.Tensor, vectors: torch.Tensor, damping: float, relative: bool
) -> torch.Tensor:
    """(Q diag(λ) Qᵀ + λ_damp I)^-1/2, computed in float64 and kept in float32 from
    :data:`FLOAT32_EIGH_WIDTH` wide on (an output head's 8192-wide factor: 256 MB, not 512, in
    memory and in each store's normalizers file; a projection matrix needs no more precision)."""
    values = values.double().clamp(min=0)
    lam = damping**0.5 * (float(values.mean()) if relative else 1.0)
    if lam <= 0:
        raise BergsonError("--whitening: a factor with no positive eigenvalue cannot be damped relatively")
    v = vectors.double()
    out = (v * (values + lam).rsqrt()) @ v.T
    return out.float() if len(out) >= FLOAT32_EIGH_WIDTH else out


def eigen_dir(path: str | Path) -> Path:
    """The ``eigen/`` stage of an EK-FAC run directory (or the stage directory itself)."""
    root = Path(path)
    for candidate in (root / EIGEN_STAGE, root):
        if Factors.complete(candidate):
            return candidate
    raise BergsonError(
        f"--whitening {path}: no fitted eigenbases there (an {EIGEN_STAGE}/ stage of `bergson ekfac`); "
        "run `bergson ekfac` first and give its run directory"
    )


def whitening_from_ekfac(
    path: str | Path,
    modules: Mapping[str, nn.Module],
    include_bias: bool,
    damping: float = WHITENING_DAMPING,
    damping_mode: str = "relative",
) -> dict[str, KfacWhitening]:
    """Each tracked module's :class:`KfacWhitening` from the eigenbases of the EK-FAC fit at ``path``.

    Every module must have been fitted, with the same bias column (``include_bias``) as the
    vectors to whiten; otherwise the error names the module and the fix."""
    from ..core.layout import module_shape

    root = eigen_dir(path)
    eigen = Factors.load(root)
    missing = [name for name in modules if name not in eigen.tensors]
    if missing:
        raise BergsonError(
            f"--whitening {path}: {len(missing)} tracked module(s) were not fitted there ({missing[0]}, ...); "
            "fit `bergson ekfac` with the same --modules (and --include_output_head) as this run"
        )
    out: dict[str, KfacWhitening] = {}
    for name, module in modules.items():
        factors = eigen.tensors[name]
        rows, cols = module_shape(module)
        width = cols + int(include_bias and getattr(module, "bias", None) is not None)
        shape = (factors["S_eigenvectors"].shape[0], factors["A_eigenvectors"].shape[0])
        if shape != (rows, width):
            raise BergsonError(
                f"--whitening {path}: module {name} was fitted as {shape[0]} x {shape[1]} and is tracked as "
                f"{rows} x {width}; fit the EK-FAC run with the same model and --include_bias"
            )
        relative = damping_mode == "relative"
        out[name] = KfacWhitening(
            left=_inverse_sqrt(factors["S_eigenvalues"], factors["S_eigenvectors"], damping, relative),
            right=_inverse_sqrt(factors["A_eigenvalues"], factors["A_eigenvectors"], damping, relative),
            eps=damping,
        )
    return out
