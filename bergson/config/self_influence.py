"""``bergson self_influence``'s options (its own module: :mod:`.commands` is at its size limit)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .options import (
    BatchOptions,
    DampingOptions,
    DataOptions,
    GradientOptions,
    HeadOptions,
    LossOptions,
    ModelOptions,
    NormalizerOptions,
    RunOptions,
    ShardOptions,
)


@dataclass
class SelfInfluenceConfig(DampingOptions, NormalizerOptions, ShardOptions, LossOptions, HeadOptions,
                          GradientOptions, BatchOptions, DataOptions, ModelOptions, RunOptions):  # fmt: skip
    """Options of ``bergson self_influence``: every document's score against itself under a method,
    with the method's preconditioner (larger = more self-influential)."""

    method: Literal["dot", "cosine", "trackstar", "ekfac"] = "dot"
    """dot: |g|² (projected, or full with --projection_dim 0); trackstar: |(R + δI)^-1/2 g̃|², g̃ divided
    by --optimizer_state's moments, R its training-set second moment; ekfac: gᵀ (F + δI)⁻¹ g with the
    EK-FAC Fisher (full gradients); cosine is refused (a cosine with itself is 1)."""

    per_token: bool = False
    """Also write each token's share g_tᵀ M g of its document's score (the token rows sum to it)."""

    stats_documents: int | None = None
    """With --method trackstar: documents sampled (seeded by --sample_seed) to fit R (None or 0: all)."""

    sample_seed: int = 0
    """With --method trackstar: seed of the --stats_documents sample."""

    fisher: Literal["true", "empirical"] = "true"
    """With --method ekfac: Fisher labels sampled from the model (true) or the dataset's tokens."""

    fisher_seed: int = 0
    """With --method ekfac: seed of the sampled Fisher labels."""

    factor_dtype: Literal["float32", "float64"] = "float32"
    """With --method ekfac: accumulation dtype of the covariances and scores."""

    top_k: int = 10
    """Most self-influential documents printed."""
