"""The one table of bergson's commands, read by the command line (:mod:`bergson.cli`: parsing,
``--help``) and by the launcher (:mod:`bergson.distributed.launch`: which commands run on
several workers, and which command starts the workers of a config). It names modules and
classes as strings, so reading it imports nothing."""

from __future__ import annotations

from typing import NamedTuple


class Command(NamedTuple):
    """One ``bergson`` subcommand."""

    module: str
    """The CLI module, with ``CONFIG`` (the config dataclass) and ``run(cfg)``."""
    summary: str
    """One line for ``bergson --help`` and the CLI reference."""
    config: str
    """The name of its config dataclass in :mod:`bergson.config` (the module's ``CONFIG``)."""
    workers: str | None = None
    """How the work is split over several workers (``--nproc_per_node`` or torchrun); None: the
    command runs in one process and refuses a launch of several."""


_SHARDS = "whole dataset shards, balanced by token count"

COMMANDS: dict[str, Command] = {
    "build": Command(
        "bergson.cli.build",
        "Collect per-document gradients of a dataset into a gradient store.",
        "IndexConfig",
        _SHARDS,
    ),
    "query": Command(
        "bergson.cli.query",
        "Find the training rows whose gradients explain a query text.",
        "QueryConfig",
    ),
    "reduce": Command(
        "bergson.cli.reduce",
        "Aggregate a dataset's gradients (or a store) into one query vector.",
        "ReduceConfig",
        _SHARDS,
    ),
    "score": Command(
        "bergson.cli.score",
        "Score every document of a dataset against query gradients in one pass (with --candidates C "
        "--method ekfac|kfac|trackstar: rescore only the top --top_k rows of earlier scores per query).",
        "ScoreConfig",
        _SHARDS,
    ),
    "preconditioner": Command(
        "bergson.cli.preconditioner",
        "Fit per-module gradient second moments on a dataset or store (or mix two, TrackStar-style).",
        "PreconditionerConfig",
        _SHARDS + "; one all-reduce of the second moments",
    ),
    "ekfac": Command(
        "bergson.cli.ekfac",
        "EK-FAC influence functions: factors, eigenvalue correction, preconditioned queries, scores.",
        "EkfacConfig",
        "whole training documents, balanced by token count",
    ),
    "trackstar": Command(
        "bergson.cli.trackstar",
        "TrackStar end to end: statistics, mixed preconditioner, query store and scores, resumable.",
        "TrackstarConfig",
        _SHARDS + " in each pass; rank 0 fits and mixes the preconditioners",
    ),
    "trak": Command(
        "bergson.cli.trak",
        "TRAK: projected Gauss-Newton scores with output weights, averaged over an ensemble of models.",
        "TrakConfig",
        _SHARDS + " in each model's passes; rank 0 solves and averages",
    ),
    "source": Command(
        "bergson.cli.source",
        "SOURCE: unrolled differentiation over a run's checkpoints, one EK-FAC curvature per segment.",
        "SourceConfig",
        "whole training documents, balanced by token count, in each segment's passes",
    ),
    "unroll": Command(
        "bergson.cli.unroll",
        "MAGIC approximated at the final state: the run's batch order and learning rates, a Krylov Gauss-Newton.",
        "UnrollConfig",
    ),
    "magic": Command(
        "bergson.cli.magic",
        "MAGIC: train once with checkpoints, then differentiate the query loss through training.",
        "MagicConfig",
        "data parallel: every N-th document of each micro-batch",
    ),
    "validate": Command(
        "bergson.cli.validate",
        "Check scores stores against real retraining without random subsets (leave-k-out, LDS).",
        "ValidateConfig",
    ),
    "report": Command(
        "bergson.cli.report",
        "Write one self-contained HTML page of the documents behind a scores store or query results.",
        "ReportConfig",
    ),
    "serve": Command(
        "bergson.cli.serve",
        "Serve a local page that explains typed queries live from a gradient store (read-only).",
        "ServeConfig",
    ),
    "convert": Command(
        "bergson.cli.convert",
        "Rewrite a store written by the original bergson package (info.json, gradients.bin) as one of ours.",
        "ConvertConfig",
    ),
    "verify": Command(
        "bergson.cli.verify",
        "Check every file of a store (sizes, row counts, checksums, finite values) and name each damaged one.",
        "VerifyConfig",
    ),
    "test_model_configuration": Command(
        "bergson.cli.test_model_configuration",
        "Check that batched gradients equal one-by-one ones; suggest --force_math_sdp / --precision if not.",
        "ModelConfigTestConfig",
    ),
    "self_influence": Command(
        "bergson.cli.self_influence",
        "Score every document against itself (dot, TrackStar or EK-FAC) to find outliers and mislabels.",
        "SelfInfluenceConfig",
    ),
}
"""Every command, in ``bergson --help`` order."""


def distributed_commands() -> list[str]:
    """The commands that split their work over several workers, in table order."""
    return [name for name, command in COMMANDS.items() if command.workers]
