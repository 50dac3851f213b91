"""The one table of the ranges numeric options accept, and the one check that reads it.

Every ``int`` or ``float`` field of a command's config (nested groups included: ``data``,
``query``, ``training``, ``faiss``) has an entry in :data:`LIMITS`, keyed by its field name, or
by ``Class.field`` where one command's option of that name means something else. The command
line checks a parsed config at once (:func:`check_limits`, before anything is loaded), and so
does :func:`bergson.config.options.validate_options` for configs built in Python; a value
outside its range is a :class:`BergsonError` naming the option, the range and what it means.
``tests/config/test_limits.py`` fails on a numeric option that has no entry.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..errors import BergsonError


@dataclass(frozen=True)
class Limit:
    """The values one numeric option accepts: ``low <= value`` (``low < value`` when
    ``open_low``), ``value <= high`` (``<`` when ``open_high``), or exactly ``zero`` when
    that special value is allowed too; ``unit`` says what the number counts."""

    low: float | None = None
    high: float | None = None
    unit: str = ""
    open_low: bool = False
    open_high: bool = False
    zero: str = ""
    """When not empty, 0 is accepted too and means this (e.g. 'full gradients')."""

    def accepts(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.zero and value == 0:
            return True
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or (value < self.high if self.open_high else value <= self.high)

    def describe(self) -> str:
        lo = hi = ""
        if self.low is not None:
            lo = f"{'>' if self.open_low else '>='} {_num(self.low)}"
        if self.high is not None:
            hi = f"{'<' if self.open_high else '<='} {_num(self.high)}"
        text = " and ".join(filter(None, (lo, hi))) or "a finite number"
        if self.zero:
            text = f"0 ({self.zero}) or {text}"
        return text + (f" ({self.unit})" if self.unit else "")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def _at_least(n: float, unit: str = "", zero: str = "") -> Limit:
    return Limit(low=n, unit=unit, zero=zero)


_SEED = _at_least(0, "a seed")
_POSITIVE = Limit(low=0, open_low=True)
_NONNEG = _at_least(0)
_DECAY = Limit(low=0, high=1, open_high=True, unit="a decay rate")

LIMITS: dict[str, Limit] = {
    # collection
    "projection_dim": _at_least(1, "rows and columns of each module's projection", zero="full gradients"),
    "projection_seed": _SEED,
    "token_batch_size": _at_least(2, "tokens per batch"),
    "shard_size": _at_least(1, "rows per shard file"),
    "nproc_per_node": _at_least(1, "worker processes"),
    "dist_timeout": Limit(low=0, open_low=True, unit="seconds"),
    "max_length": _at_least(2, "tokens; leave it unset for the token budget"),
    "chunk_length": _at_least(2, "tokens per chunk", zero="off"),
    # fitting and scoring
    "damping": _at_least(0, "added to the eigenvalues"),
    "whitening_damping": Limit(low=0, open_low=True, unit="of each factor's mean eigenvalue (squared)"),
    "downweight_components": _at_least(0, "query components", zero="no mixing"),
    "PreconditionerConfig.downweight_components": _at_least(1, "query components"),
    "max_documents": _at_least(1, "documents; leave it unset for all"),
    "stats_documents": _at_least(1, "documents", zero="all"),
    "sample_seed": _SEED,
    "fisher_seed": _SEED,
    "fisher_samples": _at_least(1, "label draws per document"),
    "query_rank": _at_least(1, "the rank of each query's approximation", zero="full"),
    "ihvp_steps": _at_least(1, "iterations of --ihvp astra or lissa"),
    "ihvp_batch_size": _at_least(1, "training documents per iteration", zero="all of them"),
    "ihvp_step_size": Limit(
        low=0, open_low=True, unit="a multiple of the iteration's unit step", zero="line search"
    ),
    "ihvp_seed": _SEED,
    "segment_steps": _at_least(0, "optimizer steps of a segment"),
    "segment_learning_rates": _at_least(0, "a learning rate"),
    "curvature_scale": Limit(low=0, open_low=True, unit="a factor on the eigenvalues", zero="automatic"),
    "top_k": _at_least(1, "rows shown per query", zero="none printed"),
    "QueryConfig.top_k": _at_least(1, "rows returned per query"),
    "ReportConfig.top_k": _at_least(1, "rows shown per query"),
    "ServeConfig.top_k": _at_least(1, "rows shown per query"),
    "TrackstarConfig.top_k": _at_least(1, "rows listed per query"),
    "CascadeEkfacConfig.top_k": _at_least(1, "candidates per query"),
    "CascadeTrackstarConfig.top_k": _at_least(1, "candidates per query"),
    "snippet_chars": _at_least(1, "characters"),
    "int8_rerank": _at_least(
        1, "candidates re-scored per result, a multiple of --top_k", zero="exact search"
    ),
    # FAISS
    "nprobe": _at_least(1, "inverted lists visited per query"),
    "num_shards": _at_least(1, "indices"),
    "max_train_examples": _at_least(1, "rows; leave it unset for the default"),
    # MAGIC and validation
    "memory_budget_gb": _at_least(0, "GB"),
    "save_checkpoints": _at_least(1, "training checkpoints", zero="none"),
    "unroll_steps": _at_least(1, "steps", zero="the whole run"),
    "query_batch_size": _at_least(1, "score columns per reverse pass"),
    "krylov_steps": _at_least(1, "Gauss-Newton products per score column"),
    "curvature_docs": _at_least(1, "documents in the Gauss-Newton"),
    "curvature_seed": _SEED,
    "fraction": Limit(low=0, high=1, open_low=True, open_high=True, unit="a share of the documents"),
    "num_subsets": _at_least(1, "retrainings"),
    "ValidateConfig.top_k": _at_least(1, "training documents removed per query"),
    "seed": _SEED,
    "num_documents": _at_least(2, "documents compared in one batch"),
    "tolerance": _POSITIVE,
    # the training recipe
    "lr": _POSITIVE,
    "beta1": _DECAY,
    "beta2": _DECAY,
    "momentum": _DECAY,
    "eps": _POSITIVE,
    "eps_root": _NONNEG,
    "weight_decay": _NONNEG,
    "warmup_steps": _at_least(0, "steps, or a fraction of them in (0, 1)"),
    "lr_start": _NONNEG,
    "lr_end": _NONNEG,
    "power": _POSITIVE,
    "max_grad_norm": _at_least(0, "a norm", zero="no clipping"),
    "batch_size": _at_least(1, "documents per micro-batch"),
    "grad_accumulation": _at_least(1, "micro-batches per step"),
    "epochs": _at_least(1, "passes over the documents"),
    # the report and the server
    "max_queries": _at_least(1, "score columns; leave it unset for all"),
    "collapse_chars": _at_least(0, "characters"),
    "bins": _at_least(1, "histogram bins"),
    "port": Limit(low=0, high=65535, unit="a TCP port; 0 picks a free one"),
    "max_query_chars": _at_least(1, "characters"),
    "max_waiting": _at_least(1, "requests"),
}


def limit_of(cls: type, name: str) -> Limit | None:
    """The limit of field ``name`` of config class ``cls`` (its own entry first, then any base
    class's, then the field name's)."""
    for base in cls.__mro__:
        hit = LIMITS.get(f"{base.__name__}.{name}")
        if hit is not None:
            return hit
    return LIMITS.get(name)


def _nested(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def check_limits(cfg: Any, prefix: str = "--") -> None:
    """Refuse a numeric option of ``cfg`` (a config dataclass; nested groups are checked as
    ``--group.field``) outside its range in :data:`LIMITS`. Values are read from the instance's
    ``__dict__``: checking a value is not using the option."""
    values = cfg.__dict__
    for f in dataclasses.fields(cfg):
        value = values.get(f.name)
        if _nested(value):
            group = "--" if f.name == "data" and prefix == "--" else f"{prefix}{f.name}."
            check_limits(value, group)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        limit = limit_of(type(cfg), f.name)
        if limit is None or limit.accepts(value):
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        raise BergsonError(
            f"{prefix}{f.name} {value}: must be {limit.describe()}; give a value in that range, "
            f"or leave the option out (default: {default})"
        )
