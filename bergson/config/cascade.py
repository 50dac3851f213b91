"""The retrieve-then-rescore cascade's configs: ``bergson score --candidates C --method M`` takes
the options of method M's own command (:mod:`.commands`) and the candidates
(:mod:`bergson.methods.cascade`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import BergsonError
from .commands import EkfacConfig, TrackstarConfig


@dataclass
class CascadeOptions:
    """The retrieve-then-rescore cascade: rescore only the top candidates of an earlier search."""

    candidates: str = ""
    """The first stage: a scores store (from bergson score, ekfac, trackstar, trak, magic, ...; or the run
    directory holding it as scores/) or a `bergson query --output` file (.jsonl, .csv, .parquet). Its rows
    must be the rows of --dataset."""


@dataclass
class CascadeEkfacConfig(CascadeOptions, EkfacConfig):
    """Options of ``bergson score --candidates C --method ekfac|kfac``: EK-FAC (or K-FAC; ASTRA, LiSSA or
    PCG with --ihvp) fitted on the whole of --dataset, scoring only the candidate rows."""

    top_k: int = 100
    """Candidates per query: each query's top k rows of --candidates; their union over the queries is
    rescored (the console prints the best 10 of each query)."""


@dataclass
class CascadeTrackstarConfig(CascadeOptions, TrackstarConfig):
    """Options of ``bergson score --candidates C --method trackstar``: TrackStar's statistics and query
    store as `bergson trackstar` fits them, scoring only the candidate rows."""

    method: Literal["trackstar"] = "trackstar"
    """The rescoring method (--method ekfac or kfac take EK-FAC's options instead)."""

    top_k: int = 100
    """Candidates per query: each query's top k rows of --candidates; their union over the queries is
    rescored (summary.md lists each query's best k after rescoring)."""


CASCADE_CONFIGS: dict[str, type] = {
    "ekfac": CascadeEkfacConfig,
    "kfac": CascadeEkfacConfig,
    "trackstar": CascadeTrackstarConfig,
}
"""The methods that rescore a cascade's candidates (``bergson score --candidates C --method M``)."""

_NO_CASCADE = {
    "magic": "MAGIC differentiates the query loss through the whole training run, so scoring a few rows "
    "costs as much as scoring them all",
    "source": "SOURCE's segments are not wired to a row subset yet",
    "trak": "TRAK's ensemble passes are not wired to a row subset yet",
    "dot": "dot products are the cheap first stage: `bergson score` scores every row in one pass",
    "cosine": "cosines are the cheap first stage: `bergson score --unit_normalize` scores every row in one pass",
}


def cascade_config_class(method: str) -> type:
    """The config of a cascade rescoring with ``method`` (ekfac, kfac or trackstar; ASTRA, LiSSA and
    PCG are ekfac with --ihvp); any other method is refused with the reason."""
    if method in CASCADE_CONFIGS:
        return CASCADE_CONFIGS[method]
    why = _NO_CASCADE.get(method, "no such method")
    raise BergsonError(
        f"--method {method} with --candidates: {why}; rescore the candidates with --method ekfac, kfac or "
        "trackstar (ASTRA: --method ekfac --ihvp astra)"
    )
