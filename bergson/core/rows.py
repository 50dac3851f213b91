"""Unit-normalized rows, the one definition every floor uses (the collector's vectors, scores,
search, reduction): a row is divided by its norm, and an all-zero row stays zero. numpy at import
time only, so that search modules may use it without importing torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """The norms [rows, 1] of the rows of ``x``, clamped away from zero (so that dividing by them
    leaves all-zero rows zero)."""
    import torch

    return x.norm(dim=1, keepdim=True).clamp(min=torch.finfo(x.dtype).tiny)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm; all-zero rows stay zero."""
    return x / row_norms(x)


def unit_rows_np(x: np.ndarray) -> np.ndarray:
    """:func:`unit_rows` for a numpy array (of its own dtype); all-zero rows stay zero."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
