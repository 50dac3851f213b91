"""Our defaults that differ from the original bergson package's (v2.5), in one table.

The start of every run that computes gradients announces the ones it uses and how to get the
original's behaviour (:func:`announce_differing_defaults`), its manifest records them, and the
docs and tests read :data:`ORIGINAL_DEFAULTS`.
"""

from __future__ import annotations

import logging
from dataclasses import MISSING, dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OriginalDefault:
    """A default of ours that differs from the original bergson package's (v2.5)."""

    ours: str
    """Our default, in words."""
    original: str
    """The original's default, in words."""
    fix: str
    """The flags that give the original's behaviour."""
    group: str
    """The option group (class name) holding the option: a run whose config has it shows the line."""
    commands: tuple[str, ...] = ()
    """The commands whose original default differs (empty: every command with the option)."""
    required: bool = False
    """Ours has no default (the option must be given), so a run never uses ours silently."""


ORIGINAL_DEFAULTS: dict[str, OriginalDefault] = {
    "precision": OriginalDefault(
        "auto (bf16 on a GPU that supports it, else fp32)", "fp32", "--precision fp32", "ModelOptions"
    ),
    "projection_dim": OriginalDefault(
        "16 (random projection to 16x16 per module)", "0 (full gradients)", "--projection_dim 0",
        "GradientOptions", commands=("build", "reduce", "score", "preconditioner"),
    ),
    "nproc_per_node": OriginalDefault(
        "1 worker", "one worker per visible GPU", "--nproc_per_node N (the number of GPUs)", "WorkerOptions"
    ),
    "dataset": OriginalDefault(
        "none (--dataset is required)", "NeelNanda/pile-10k", "--dataset NeelNanda/pile-10k", "DataOptions",
        required=True,
    ),
    "model": OriginalDefault(
        "none (--model is required)", "EleutherAI/pythia-160m", "--model EleutherAI/pythia-160m", "ModelOptions",
        required=True,
    ),
}  # fmt: skip
"""Our defaults that differ from the original bergson's, in one place: the start of every run
that computes gradients announces the ones it uses (and its manifest records them), and the docs
and tests read this table."""


def differing_defaults(cfg: Any, command: str) -> dict[str, dict[str, str]]:
    """The entries of :data:`ORIGINAL_DEFAULTS` that a run of ``command`` with ``cfg`` uses: the
    options it offers, leaves at our default and whose original default differs for it."""
    out = {}
    for name, d in ORIGINAL_DEFAULTS.items():
        if d.required or (d.commands and command not in d.commands):
            continue
        if any(c.__name__ == d.group for c in type(cfg).__mro__) and _at_default(cfg, name):
            out[name] = {"ours": d.ours, "original": d.original, "fix": d.fix}
    return out


def announce_differing_defaults(cfg: Any, command: str) -> dict[str, dict[str, str]]:
    """Say on the console which of our defaults a run uses that differ from the original
    bergson's, and how to get its behaviour; returns them, for the run's manifest."""
    found = differing_defaults(cfg, command)
    if found:
        logger.info(
            "defaults that differ from the original bergson: %s",
            "; ".join(
                f"{n} {d['ours']} (original: {d['original']}; pass {d['fix']})" for n, d in found.items()
            ),
        )
    return found


def _at_default(cfg: Any, name: str) -> bool:
    f = type(cfg).__dataclass_fields__[name]
    default = f.default_factory() if f.default_factory is not MISSING else f.default
    return getattr(cfg, name) == default
