"""Random projection matrices, regenerated on demand from (seed, module name, side).

The two-sided projection of a per-example gradient G (out x in) is L G R^T with
L (p x out) and R (p x in) having i.i.d. N(0, 1/p) entries, so that
E[<L A R^T, L B R^T>] = <A, B>. The matrices are drawn on the CPU from a generator
seeded by a stable hash, so they are identical on every device and in every run.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Literal

import torch

Side = Literal["left", "right"]


def projection_seed(seed: int, name: str, side: Side) -> int:
    """A 63-bit seed derived from the global seed, the module name and the side."""
    digest = hashlib.sha256(f"{seed}\x00{name}\x00{side}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@lru_cache(maxsize=1024)
def _cpu_matrix(seed: int, name: str, side: Side, p: int, n: int) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(projection_seed(seed, name, side))
    mat = torch.randn(p, n, generator=gen, dtype=torch.float64)
    return mat.div_(p**0.5)


def projection_matrix(
    seed: int,
    name: str,
    side: Side,
    p: int,
    n: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The p x n projection matrix for one side of one module."""
    return _cpu_matrix(seed, name, side, p, n).to(device=device, dtype=dtype)
