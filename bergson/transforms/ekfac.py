"""K-FAC and EK-FAC curvature factors of linear layers, and inverse-Fisher-vector products.

For a linear layer with per-document gradient G_n = Σ_t g_t x_tᵀ (out × in; x gets a
column of ones when biases are included), flattened row-major:

* ``A`` = (1/T) Σ_tokens x xᵀ (T: number of tokens), ``S`` = (1/N) Σ_tokens g gᵀ (N:
  number of documents), so that for the exact Fisher F = (1/N) Σ_n vec(G_n) vec(G_n)ᵀ the
  K-FAC approximation is F ≈ S ⊗ A (cross-token terms dropped). With one token per
  document both are plain means.
* Eigendecompositions (in the factors' precision) A = Q_A diag(λ_A) Q_Aᵀ and S = Q_S diag(λ_S) Q_Sᵀ; the
  K-FAC eigenvalues are λ_S[i] λ_A[j].
* EK-FAC (George et al. 2018) keeps the Kronecker eigenbasis Q_S ⊗ Q_A but refits the
  eigenvalues as the mean squared per-document gradient in that basis:
  Λ[i, j] = (1/N) Σ_n (Q_Sᵀ G_n Q_A)[i, j]², the diagonal of Qᵀ F Q, which is what makes
  it at least as close to F as K-FAC.

The inverse-Fisher-vector product of a query gradient G is
Q_S [(Q_Sᵀ G Q_A) / (Λ + δ)] Q_Aᵀ with damping δ absolute or relative to the mean of Λ.
The default is relative, 0.1 × mean(Λ) per module: gradients of different layers and models
differ by orders of magnitude, so an absolute default would vanish for some layers and
swamp others; 0.1 of the mean eigenvalue is the common heuristic of the influence-function
literature (Grosse et al. 2023) and bounds the condition number by 1 + 10 max(Λ)/mean(Λ).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.files import atomic_write_bytes
from ..errors import BergsonError


@dataclass
class Factors:
    """Per-module tensors of one stage, saved as ``factors.safetensors`` + ``factors.json``.

    ``tensors[module][key]``; ``meta`` is free-form (counts, options) and its JSON file is
    written last, marking the stage complete.
    """

    tensors: dict[str, dict[str, torch.Tensor]]
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        flat = {f"{m}/{k}": t.contiguous() for m, d in self.tensors.items() for k, t in d.items()}
        tmp = root / ".factors.safetensors.tmp"
        save_file(flat, str(tmp))
        tmp.replace(root / "factors.safetensors")
        meta = {**self.meta, "modules": list(self.tensors)}
        atomic_write_bytes(root / "factors.json", json.dumps(meta, indent=2).encode())

    @staticmethod
    def complete(path: str | Path) -> bool:
        return (Path(path) / "factors.json").is_file() and (Path(path) / "factors.safetensors").is_file()

    @classmethod
    def _checked(cls, path: str | Path) -> Path:
        root = Path(path)
        if not cls.complete(root):
            raise BergsonError(
                f"{root}: not a complete factor directory (factors.json and factors.safetensors)"
            )
        return root

    @classmethod
    def names(cls, path: str | Path) -> dict[str, set[str]]:
        """Each module's tensor names in a saved factor directory, from the file's header alone."""
        from safetensors import safe_open

        root = cls._checked(path)
        out: dict[str, set[str]] = {
            m: set() for m in json.loads((root / "factors.json").read_text())["modules"]
        }
        with safe_open(str(root / "factors.safetensors"), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                module, name = key.rsplit("/", 1)
                out[module].add(name)
        return out

    @classmethod
    def load(cls, path: str | Path) -> Factors:
        from safetensors import safe_open

        root = cls._checked(path)
        meta = json.loads((root / "factors.json").read_text())
        tensors: dict[str, dict[str, torch.Tensor]] = {m: {} for m in meta["modules"]}
        with safe_open(str(root / "factors.safetensors"), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                module, name = key.rsplit("/", 1)
                tensors[module][name] = f.get_tensor(key)
        return cls(tensors, meta)


GRAM_BLOCK = 1024
"""Factors wider than this accumulate only their lower triangle, in row blocks of this many rows."""


def add_gram(acc: torch.Tensor, x: torch.Tensor) -> None:
    """Add xᵀx (x [T, n]) to ``acc`` [n, n]. A factor wider than ``GRAM_BLOCK`` gets its lower
    triangle (diagonal included) only, one block of rows at a time, which skips almost half the
    flops of the full product (torch has no symmetric rank-k update); :func:`symmetrise` fills in
    the upper triangle once, after the last batch."""
    n = x.shape[1]
    if n <= GRAM_BLOCK:
        acc.addmm_(x.T, x)
        return
    for lo in range(0, n, GRAM_BLOCK):
        hi = min(lo + GRAM_BLOCK, n)
        acc[lo:hi, :hi].addmm_(x[:, lo:hi].T, x[:, :hi])


def symmetrise(acc: torch.Tensor) -> torch.Tensor:
    """The full symmetric matrix of a sum :func:`add_gram` accumulated: its blocks above the
    diagonal blocks (zero until now) are copied from below, in place. Factors no wider than
    ``GRAM_BLOCK`` are full already."""
    for lo in range(GRAM_BLOCK, acc.shape[0], GRAM_BLOCK):
        hi = min(lo + GRAM_BLOCK, acc.shape[0])
        acc[:lo, lo:hi] = acc[lo:hi, :lo].T
    return acc


def add_covariances(
    sums: dict[str, dict[str, torch.Tensor]], name: str, x: torch.Tensor, g: torch.Tensor
) -> None:
    """Add Σ x xᵀ to ``sums[name]["A"]`` and Σ g gᵀ to ``sums[name]["S"]`` for the positions of
    one batch, x [T, in] and g [T, out] (created on first use; a wide factor holds its lower
    triangle only until :func:`finish_covariances`)."""
    d = sums.setdefault(
        name, {"A": x.new_zeros(x.shape[1], x.shape[1]), "S": g.new_zeros(g.shape[1], g.shape[1])}
    )
    add_gram(d["A"], x)
    add_gram(d["S"], g)


def finish_covariances(sums: dict[str, dict[str, torch.Tensor]]) -> None:
    """Make every factor :func:`add_covariances` summed symmetric (after the last batch)."""
    for d in sums.values():
        for key in d:
            d[key] = symmetrise(d[key])


def add_corrections(
    sums: dict[str, torch.Tensor],
    name: str,
    bases: tuple[torch.Tensor, torch.Tensor],
    x: torch.Tensor,
    g: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> None:
    """Add Σ_n (Q_Sᵀ G_n Q_A)² (elementwise) to ``sums[name]`` for the examples of one batch, x
    [B, T, in] and g [B, T, out] (G_n = Σ_t g_t x_tᵀ; ``mask`` [B, T] marks the real positions,
    None: all), with ``bases`` = (Q_S, Q_A) in the batch's dtype and device.

    One matmul per side for the whole batch, on whichever side is cheaper: rotate every real
    position, (g_t Q_S) and (x_t Q_A), then form Σ_t per example (T_real (out² + in²) flops), or
    form G_n and rotate it (B (out² in + out in²)); documents shorter than the layer's input width
    make the first cheaper (an output head's)."""
    qs, qa = bases
    b, t, n_in = x.shape
    n_out = g.shape[-1]
    real = b * t if mask is None else int(mask.sum())
    if real * (n_out * n_out + n_in * n_in) < b * n_out * n_in * (n_out + n_in):
        if mask is None:
            gr, xr = (
                (g.reshape(-1, n_out) @ qs).view(b, t, n_out),
                (x.reshape(-1, n_in) @ qa).view(b, t, n_in),
            )
        else:
            gr, xr = g.new_zeros(b, t, n_out), x.new_zeros(b, t, n_in)
            gr[mask], xr[mask] = g[mask] @ qs, x[mask] @ qa
        sq = (gr.mT @ xr).square().sum(0)  # [out, in]
    else:
        grads = g.mT @ x  # [B, out, in]
        left = qs.T @ grads.transpose(0, 1).reshape(n_out, b * n_in)  # [out, B in]
        sq = (left.view(n_out * b, n_in) @ qa).square().view(n_out, b, n_in).sum(1)
    sums[name] = sums[name] + sq if name in sums else sq


FLOAT32_EIGH_WIDTH = 2048
"""float32 factors at least this wide are eigendecomposed in float32; narrower ones in float64."""


def eigendecompose(covariances: Factors, float32_width: int = FLOAT32_EIGH_WIDTH) -> Factors:
    """Eigendecompositions of each module's A and S. A float32 factor (``--factor_dtype float32``,
    the default) at least ``float32_width`` wide (an output head's S) is eigendecomposed in float32,
    which halves its time and whose rounding is of the order of the rounding already in the
    float32 sums (scores agree with a float64 eigendecomposition's to ~1e-6 of their scale);
    every other factor in float64, where it costs little and keeps the eigenbases of narrow
    layers identical across numbers of workers up to float64 rounding. Eigenvalues are float64.
    One factor at a time; ``eigh`` reads the lower triangle only, so no symmetrised copy of a
    large factor is made."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, d in covariances.tensors.items():
        entry = {}
        for key in ("A", "S"):
            wide = d[key].dtype == torch.float32 and d[key].shape[0] >= float32_width
            lam, vecs = torch.linalg.eigh(d[key].to(torch.float32 if wide else torch.float64), UPLO="L")
            entry[f"{key}_eigenvalues"] = lam.double().clamp(min=0)
            entry[f"{key}_eigenvectors"] = vecs
        out[name] = entry
    return Factors(out, {"stage": "eigen"})


def kfac_eigenvalues(eigen: Factors, name: str) -> torch.Tensor:
    """K-FAC eigenvalues λ_S[i] λ_A[j] (out × in) of module ``name``."""
    d = eigen.tensors[name]
    return torch.outer(d["S_eigenvalues"], d["A_eigenvalues"])


def damping_value(eigenvalues: torch.Tensor, damping: float, mode: str) -> float:
    """δ: ``damping`` itself (absolute) or ``damping`` × mean eigenvalue (relative)."""
    if mode not in ("relative", "absolute"):
        raise BergsonError(f"--damping_mode {mode!r}: choose relative or absolute")
    if not damping >= 0:
        raise BergsonError(f"--damping {damping}: must be >= 0")
    return damping if mode == "absolute" else damping * float(eigenvalues.mean())


def ihvp(
    eigen: Factors,
    eigenvalues: torch.Tensor,
    name: str,
    grads: torch.Tensor,
    damping: float = 0.1,
    mode: str = "relative",
) -> torch.Tensor:
    """(F + δI)⁻¹ G for gradients [B, out, in] with F = Q diag(eigenvalues) Qᵀ (EK-FAC or K-FAC)."""
    if not bool((eigenvalues > 0).any()) and (mode == "relative" or damping == 0):
        # no curvature at all (an expert no training token reached, so every training gradient of it
        # is zero too): its influence is zero, not a division by a zero damping
        return torch.zeros_like(grads)
    d = eigen.tensors[name]
    qs = d["S_eigenvectors"].to(grads)
    qa = d["A_eigenvectors"].to(grads)
    delta = damping_value(eigenvalues, damping, mode)
    denom = (eigenvalues.to(grads) + delta).clamp(min=torch.finfo(grads.dtype).tiny)
    return qs @ ((qs.T @ grads @ qa) / denom) @ qa.T


def flat_inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """⟨a_n, b_q⟩ over the trailing (out, in) axes, [N, Q], as one matrix product: the same as
    ``einsum("noi,qoi->nq")``, which here first copies ``b`` into a layout of its own (12× slower
    on an output head's 20 queries of 8,192 × 128)."""
    return a.reshape(len(a), -1) @ b.reshape(len(b), -1).T


def dense_fisher(eigen: Factors, eigenvalues: torch.Tensor, name: str) -> torch.Tensor:
    """The approximate Fisher as a dense (out·in)² matrix, row-major vec (for tests on toy models)."""
    d = eigen.tensors[name]
    q = torch.kron(d["S_eigenvectors"].double(), d["A_eigenvectors"].double())
    return (q * eigenvalues.double().reshape(-1)) @ q.T
