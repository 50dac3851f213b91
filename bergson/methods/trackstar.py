"""``bergson trackstar``: TrackStar (Chang et al. 2024) as resumable steps under one run directory.

TrackStar scores a training document d against a query q by the cosine of their
optimizer-normalized, projected gradients, both multiplied by H^{-1/2}, where H mixes
the second moments of the query set and of the training set so that only the top few
query components are down-weighted (see :mod:`bergson.transforms.preconditioners`).

Steps (each skipped when its output is complete, or when every step that reads it is, so a
killed run resumes where it stopped):

    train_stats/   second moment of a sample of the training set's gradient vectors
    query/         gradient store of the query set (normalized, projected)
    query_stats/   second moment of the query vectors (skipped with --downweight_components 0)
    mixed/         the task-specific mixture of the two (skipped with --downweight_components 0)
    scores/        a scores store: one column per query, one row per training document
    summary.md     the top-k training documents of every query, readable; top_k.jsonl the same as data

The statistics are d x d per module (d = projection_dim squared), so they, not the scores,
fill the disk: they are stored in float32 (the maths stays float64), and train_stats/ and
query_stats/ are deleted once mixed/ is complete (only the mix reads them; mixed/ records
their sha256 and mixing weights). mixed/ stays: it is the preconditioner the scores used.
Every step's disk use is logged and recorded in timings.json and summary.md.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..config import DataConfig, IndexConfig, ScoreConfig, TrackstarConfig, options_of, to_dict
from ..core.files import atomic_write_bytes, disk_bytes, megabytes
from ..data import TokenizedDocs, load_data
from ..errors import BergsonError
from ..models import find_tracked_modules, honours_numerics, load_model
from ..preconditioning import fit_on_documents
from ..runs.documents import load_docs, subsample, token_budget, validate_index_config
from ..runs.manifests import resolve_normalizers
from ..runs.rundir import RunDir
from ..runs.shared_store import write_store
from ..scoring import score_documents
from ..store import GradientStore, load_gradients
from ..store.scores import top_rows
from ..transforms.normalizers import Normalizer
from ..transforms.preconditioners import (
    Preconditioner,
    is_complete,
    layout_of,
    load_preconditioner,
    mix_preconditioners,
    second_moments_of_store,
)

logger = logging.getLogger(__name__)

STEPS = ("train_stats", "query", "query_stats", "mixed", "scores", "summary")
CONFIG_FILE = "trackstar.yaml"
STATS_DTYPE = torch.float32
"""How the statistics are stored: float64 changes scores by ~1e-7 (tests/methods/test_trackstar.py)."""
STEP_OUTPUTS = {"summary": ("summary.md", "top_k.jsonl")}


def _index_options(cfg: TrackstarConfig, **changes: Any) -> IndexConfig:
    """One of TrackStar's passes as a build: no normalizer file or preconditioner of its own."""
    return options_of(IndexConfig, cfg, **{"optimizer_state": None, "overwrite": False, **changes})


def _texts(data: DataConfig, option: str) -> list[str]:
    ds = load_data(data, option=option)
    prompts = [str(t) for t in ds[data.prompt_column]]
    if data.completion_column:
        return [f"{p} {c}" for p, c in zip(prompts, ds[data.completion_column])]
    return prompts


class _Pipeline:
    def __init__(
        self,
        cfg: TrackstarConfig,
        normalizers: Mapping[str, Normalizer] | None,
        run_dir: RunDir,
        rescore: Any = None,
    ):
        self.cfg = cfg
        self.rescore = rescore
        self.run_dir = run_dir
        self.root = run_dir.root
        self.model, self.tokenizer = load_model(cfg)
        self.max_tokens = token_budget(cfg, self.model)
        self.pad = self.tokenizer.pad_token_id
        self.modules = find_tracked_modules(
            self.model,
            cfg.modules,
            include_output_head=cfg.include_output_head,
            track_experts=cfg.tracked_experts(),
        )
        self.normalizers = resolve_normalizers(cfg, self.model, self.modules, normalizers)
        self._docs: TokenizedDocs | None = None

    @property
    def docs(self) -> TokenizedDocs:
        if self._docs is None:
            self._docs = load_docs(self.cfg.data, self.tokenizer, self.max_tokens)
        return self._docs

    def step(self, name: str, done: bool, fn: Callable[[], None]) -> None:
        """Run a step unless rank 0 finds it complete; every rank runs it (the collection passes
        split their work over the ranks; the rest happens on rank 0 while the others wait).
        Logs and records (``<step>_bytes`` in timings.json) the disk use of its output."""
        if distributed.broadcast(done):
            logger.info("trackstar: %s is complete; skipping", name)
            return
        logger.info("trackstar: %s", name)
        start = time.perf_counter()
        fn()
        distributed.barrier(f"the end of trackstar's {name} step")
        size = sum(disk_bytes(self.root / out) for out in STEP_OUTPUTS.get(name, (name,)))
        self.run_dir.record(name, start, **{f"{name}_bytes": size})
        logger.info(
            "trackstar: %s done in %.1f s; %s on disk (the run directory: %s)",
            name, self.run_dir.timings.get(name, 0.0), megabytes(size), megabytes(disk_bytes(self.root)),
        )  # fmt: skip

    def remove(self, names: tuple[str, ...], why: str) -> None:
        """Delete steps' outputs that no later step reads (rank 0), saying so and recording the
        bytes freed (``deleted_<step>_bytes`` in timings.json)."""

        def remove() -> None:
            start = time.perf_counter()
            deleted = {}
            for name in names:
                path = self.root / name
                if path.exists():
                    deleted[f"deleted_{name}_bytes"] = size = disk_bytes(path)
                    shutil.rmtree(path)
                    logger.info("trackstar: deleted %s/ (%s): %s", name, megabytes(size), why)
            if deleted:
                self.run_dir.record("cleanup", start, **deleted)

        distributed.on_rank_zero(remove, "deleting statistics no later step reads")

    # ------------------------------------------------------------------ steps
    def fit(self, docs: TokenizedDocs, source: dict[str, Any]) -> Preconditioner:
        cfg = self.cfg
        return fit_on_documents(
            _index_options(cfg),
            self.model,
            self.modules,
            docs,
            self.max_tokens,
            self.pad,
            self.normalizers,
            damping=cfg.damping,
            damping_mode=cfg.damping_mode,
            source=source,
        )

    def train_stats(self) -> None:
        sample, _ = subsample(self.docs, self.cfg.stats_documents, self.cfg.sample_seed)
        source = {**to_dict(self.cfg.data), "documents": len(sample), "sample_seed": self.cfg.sample_seed}
        pre = self.fit(sample, source)  # summed over the ranks
        distributed.on_rank_zero(
            lambda: pre.save(self.root / "train_stats", STATS_DTYPE), "saving train_stats"
        )

    def query(self) -> None:
        qcfg = _index_options(self.cfg, run_path=str(self.root / "query"), data=self.cfg.query)
        qcfg = replace(qcfg, aggregation="none", unit_normalize=False)
        qdocs = load_docs(self.cfg.query, self.tokenizer, self.max_tokens, option="--query.dataset")
        write_store(qcfg, self.model, qdocs, self.max_tokens, self.pad, self.normalizers)

    def query_stats(self) -> None:
        distributed.on_rank_zero(self._query_stats, "fitting query_stats")

    def _query_stats(self) -> None:
        store = load_gradients(self.root / "query")
        moments, count = second_moments_of_store(store)
        Preconditioner(
            moments,
            num_rows=count,
            layout=layout_of(store.manifest),
            damping=self.cfg.damping,
            damping_mode=self.cfg.damping_mode,
            source={"index": str(store.root), "rows": len(store)},
        ).save(self.root / "query_stats", STATS_DTYPE)

    def mixed(self) -> None:
        def mix() -> None:
            train = load_preconditioner(self.root / "train_stats")
            query = load_preconditioner(self.root / "query_stats")
            mixed = mix_preconditioners(train, query, self.cfg.downweight_components)
            mixed.save(self.root / "mixed", STATS_DTYPE)

        distributed.on_rank_zero(mix, "mixing the preconditioners")

    @property
    def preconditioner_dir(self) -> Path:
        return self.root / ("mixed" if self.cfg.downweight_components > 0 else "train_stats")

    def scores(self) -> None:
        scfg = options_of(
            ScoreConfig,
            self.cfg,
            run_path=str(self.root / "scores"),
            optimizer_state=None,
            overwrite=False,
            preconditioner_path=str(self.preconditioner_dir),
            query_path=str(self.root / "query"),
            score="individual",
        )
        if self.rescore is not None:  # the cascade (bergson.methods.cascade): its candidate rows only
            self.rescore.score_store(scfg, self.model, self.docs, self.max_tokens, self.pad)
            return
        score_documents(
            scfg, self.model, self.docs, self.max_tokens, load_gradients(self.root / "query"), self.pad
        )

    def summary(self) -> None:
        distributed.on_rank_zero(
            lambda: write_summary(self.cfg, load_gradients(self.root / "scores"), self.run_dir.timings),
            "writing the summary",
        )


def write_summary(cfg: TrackstarConfig, scores: GradientStore, timings: Mapping[str, Any]) -> None:
    """``summary.md`` (readable) and ``top_k.jsonl`` (one line per query and rank)."""
    root = Path(cfg.run_path)
    train_texts = _texts(cfg.data, "--dataset")
    query_texts = _texts(cfg.query, "--query.dataset")
    query_rows = load_gradients(root / "query").rows["row_id"]
    kind = "cosine" if cfg.unit_normalize else "inner product"
    lines = [
        "# TrackStar: the training documents behind each query",
        "",
        f"Scores are the {kind} of preconditioned, normalized gradients; positive means training on the "
        "document lowers the query's loss.",
        "",
        "Step wall times (s): " + ", ".join(f"{k} {timings[k]:.1f}" for k in STEPS if k in timings),
        "",
        "Disk use: "
        + ", ".join(f"{k}/ {megabytes(timings[f'{k}_bytes'])}" for k in STEPS if f"{k}_bytes" in timings)
        + "".join(
            f"; deleted {k}/ ({megabytes(timings[f'deleted_{k}_bytes'])}) once mixed/ was complete"
            for k in STEPS
            if f"deleted_{k}_bytes" in timings
        ),
        "",
    ]
    records = []
    for col, hits in enumerate(top_rows(scores, cfg.top_k)):
        qtext = " ".join(query_texts[int(query_rows[col])].split())
        lines += [f"## Query {col}: {qtext[:200]}", "", "| rank | score | row | text |", "|---|---|---|---|"]
        for rank, (row, value) in enumerate(hits, 1):
            text = " ".join(train_texts[row].split())[:160].replace("|", "\\|")
            lines.append(f"| {rank} | {value:+.4f} | {row} | {text} |")
            records.append({"query": col, "rank": rank, "row_id": row, "score": value, "text": text})
        lines.append("")
    (root / "top_k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    atomic_write_bytes(root / "summary.md", "\n".join(lines).encode())


@distributed.entry(lambda cfg: load_gradients(Path(cfg.run_path) / "scores"))
@honours_numerics
def trackstar(
    cfg: TrackstarConfig, normalizers: Mapping[str, Normalizer] | None = None, rescore: Any = None
) -> GradientStore:
    """Run (or resume) the TrackStar pipeline; returns the scores store. On several workers
    (``--nproc_per_node`` or torchrun) the statistics, query and scores passes split their
    shards over the ranks; rank 0 fits and mixes the preconditioners and writes the summary.
    ``rescore`` (:class:`bergson.methods.cascade.Rescore`): the scores pass runs on its rows alone."""
    started = time.perf_counter()
    validate_index_config(cfg)
    if cfg.downweight_components < 0:
        raise BergsonError(f"--downweight_components {cfg.downweight_components}: must be >= 0")
    if not cfg.query.dataset:
        raise BergsonError("--query.dataset is required: the queries to explain")
    run_dir = RunDir(
        cfg,
        command="trackstar",
        what="a TrackStar run",
        config_file=CONFIG_FILE,
        outputs=(*STEPS, "summary.md", "top_k.jsonl"),
        shared="its later steps read on every rank what earlier ones wrote there: the query store, "
        "its statistics and the mixed preconditioner",
    ).prepare()
    root = run_dir.root

    run = _Pipeline(cfg, normalizers, run_dir, rescore)
    if rescore is not None:  # the cascade's candidates, checked before the statistics are fitted
        rescore.select(run.docs)
    # a step is done when its output is complete or every step that reads it is done (the
    # statistics that only the mix reads are deleted once mixed/ is complete)
    mixing = cfg.downweight_components > 0
    scores_done = _store_complete(root / "scores")
    mixed_done = mixing and (scores_done or is_complete(root / "mixed"))
    run.step("train_stats", is_complete(root / "train_stats") or mixed_done or scores_done, run.train_stats)
    run.step("query", _store_complete(root / "query"), run.query)
    if mixing:
        run.step("query_stats", is_complete(root / "query_stats") or mixed_done, run.query_stats)
        run.step("mixed", mixed_done, run.mixed)
        run.remove(("train_stats", "query_stats"), "only the mix reads it, and mixed/ is complete")
    else:
        logger.info(
            "trackstar: no query_stats or mixed step: --downweight_components 0 uses train_stats alone"
        )
    run.step("scores", scores_done, run.scores)
    run.step("summary", False, run.summary)
    total = disk_bytes(root)
    run_dir.record("total", started, run_bytes=total)  # this invocation's seconds, the directory's bytes
    logger.info("trackstar: the run directory %s holds %s", root, megabytes(total))
    return load_gradients(root / "scores")


def _store_complete(path: Path) -> bool:
    try:
        return load_gradients(path).manifest.status == "complete"
    except BergsonError:
        return False
