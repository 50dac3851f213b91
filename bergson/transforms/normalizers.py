"""Optimizer second-moment normalizers.

A normalizer divides a gradient elementwise by the square root of a second-moment
estimate v (plus eps), as Adam-family optimizers do to their updates.

* ``AdafactorNormalizer`` keeps the rank-one estimate v_ij = r_i c_j / sum(r) of
  Adafactor. Its inverse square root factors into a row scale on the output gradient g
  and a column scale on the input x, so it is applied before projection (cheap path).
* ``AdamNormalizer`` keeps the full elementwise estimate; it needs the full per-example
  gradient, which is then projected if a projection is requested.
* ``KfacWhitening`` is not an optimizer's: it maps G to S^-1/2 G A^-1/2 with the damped K-FAC
  factors of an EK-FAC fit (``--whitening``, :mod:`bergson.transforms.whitening`). Like the
  Adafactor scales it folds into the projection matrices (L S^-1/2 and R A^-1/2), so it keeps
  the cheap projected path, and dot products of whitened vectors are K-FAC influence scores.

Shapes follow the "out x in" convention of ``torch.nn.Linear.weight``. When the bias is
included it is treated as an extra input column (input value 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import BergsonError


@dataclass
class AdafactorNormalizer:
    """Rank-one second moment: ``row`` (out,) and ``col`` (in,) factors.

    ``bias_col`` is the column factor of the bias (treated as an extra input column);
    it is required only when biases are included.
    """

    row: torch.Tensor
    col: torch.Tensor
    bias_col: torch.Tensor | None = None
    eps: float = 1e-30

    def scales(self, include_bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (a, b) with 1/sqrt(v_ij) = a_i * b_j; b covers the bias column if asked."""
        col = self.col
        if include_bias:
            if self.bias_col is None:
                raise BergsonError(
                    "include_bias is set but the Adafactor normalizer has no bias column factor"
                )
            col = torch.cat([col, self.bias_col.reshape(1).to(col)])
        total = self.row.sum()
        a = (self.row + self.eps).rsqrt()
        b = (total / (col + self.eps)).sqrt()
        return a, b

    def dense(self, include_bias: bool = False) -> torch.Tensor:
        """The dense second-moment estimate r c^T / sum(r) (for tests and inspection)."""
        col = self.col
        if include_bias:
            assert self.bias_col is not None
            col = torch.cat([col, self.bias_col.reshape(1).to(col)])
        return torch.outer(self.row, col) / self.row.sum()


@dataclass
class AdamNormalizer:
    """Elementwise second moment of the weight (out x in) and optionally of the bias (out,)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    eps: float = 1e-8

    def apply(
        self, grad_w: torch.Tensor, grad_b: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalize per-example gradients ``grad_w`` [B, out, in] and ``grad_b`` [B, out]."""
        if tuple(grad_w.shape[1:]) != tuple(self.weight.shape):
            raise BergsonError(
                f"Adam normalizer has shape {tuple(self.weight.shape)}, gradient has {tuple(grad_w.shape[1:])}"
            )
        grad_w = grad_w / (self.weight.to(grad_w).sqrt() + self.eps)
        if grad_b is not None:
            if self.bias is None:
                raise BergsonError("include_bias is set but the Adam normalizer has no bias moment")
            grad_b = grad_b / (self.bias.to(grad_b).sqrt() + self.eps)
        return grad_w, grad_b

    def to_adafactor(self) -> AdafactorNormalizer:
        """Best rank-one (Adafactor-style) form: row and column sums of the second moment."""
        w = self.weight.float()
        bias_col = None
        if self.bias is not None:
            # the bias column joins the matrix as column `in`; its column sum is sum(v_bias)
            bias_col = self.bias.float().sum()
            row = w.sum(1) + self.bias.float()
        else:
            row = w.sum(1)
        return AdafactorNormalizer(row=row, col=w.sum(0), bias_col=bias_col)


WHITENING_DAMPING = 0.01
"""The default relative damping of K-FAC whitening (see :mod:`bergson.transforms.whitening`)."""


@dataclass
class KfacWhitening:
    """Two symmetric matrices: ``left`` (out x out) = (S + λ_S)^-1/2 and ``right`` (in x in, or
    in+1 x in+1 with the bias column) = (A + λ_A)^-1/2; a gradient G becomes left @ G @ right.
    ``eps`` records the relative damping they were made with (for the store's manifest)."""

    left: torch.Tensor
    right: torch.Tensor
    eps: float = WHITENING_DAMPING

    def apply(self, aug: torch.Tensor) -> torch.Tensor:
        """Whiten per-example gradients ``aug`` [B, out, in(+1)] (the bias column last, if any)."""
        if tuple(aug.shape[1:]) != (self.left.shape[0], self.right.shape[0]):
            raise BergsonError(
                f"K-FAC whitening has shape {(self.left.shape[0], self.right.shape[0])}, gradient has "
                f"{tuple(aug.shape[1:])}; fit the EK-FAC run with the same --include_bias"
            )
        return self.left.to(aug) @ aug @ self.right.to(aug)


Normalizer = AdafactorNormalizer | AdamNormalizer | KfacWhitening

KINDS: dict[str, type] = {
    "adafactor": AdafactorNormalizer,
    "adam": AdamNormalizer,
    "kfac_whitening": KfacWhitening,
}
"""The name each normalizer class is saved (and recorded in a manifest) under."""


def kind_of(norm: Normalizer) -> str:
    """The name :data:`KINDS` gives ``norm``'s class."""
    return next(k for k, cls in KINDS.items() if isinstance(norm, cls))


NORMALIZERS_FILE = "normalizers.safetensors"


def save_normalizers(path: str | Path, normalizers: Mapping[str, Normalizer]) -> None:
    """Write normalizers to a safetensors file (keys ``module/field``, kind per module in metadata)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    for name, norm in normalizers.items():
        meta[name] = kind_of(norm)
        meta[f"{name}/eps"] = repr(norm.eps)
        for key, value in vars(norm).items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
    save_file(tensors, str(path), metadata=meta)


def load_normalizers(path: str | Path) -> dict[str, Normalizer]:
    """Read normalizers written by :func:`save_normalizers`."""
    from safetensors import safe_open

    out: dict[str, Normalizer] = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    for name, kind in meta.items():
        if "/" in name:
            continue
        fields = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.rsplit("/", 1)[0] == name}
        eps = float(meta[f"{name}/eps"])
        if kind not in KINDS:
            raise BergsonError(f"{path}: module {name} has a normalizer of unknown kind {kind!r}")
        out[name] = KINDS[kind](**fields, eps=eps)
    return out
