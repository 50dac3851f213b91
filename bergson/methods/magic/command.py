"""``bergson magic``: the command around the replay and the reverse pass. It checks the
options, loads the model and documents, keeps the run directory (training checkpoints,
finished reverse passes, the fine-tuned model) and writes the scores store, one column per
query group, oriented like every bergson score.

Up to ``--query_batch_size`` columns share a reverse pass (their cotangents travel together).
What a resume no longer needs is deleted as soon as that is so: a pass's progress file (a
state-sized cotangent per column it carries) once its columns are done, and the training
checkpoints (``states/``) and finished columns (``reverse/``) once the scores store is
written. ``model/`` (with the optimizer's state, ``optimizer.pt``), ``trainer/`` (the Trainer-style
``trainer_state.json`` and any ``--save_checkpoints``) and ``scores/`` stay. Each stage's disk
use is logged and recorded in ``timings.json``."""

from __future__ import annotations

import io
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ... import distributed
from ...config import MagicConfig
from ...core.files import atomic_write_bytes, disk_bytes, megabytes
from ...data import TokenizedDocs
from ...errors import BergsonError
from ...models import honours_numerics
from .replay import Replay, query_gradient, use_double_backward_attention
from .reverse import MagicRun
from .training_state import (
    TRAINER_DIR,
    TRAINER_STATE,
    CheckpointWriter,
    checkpoint_steps_to_save,
    optimizer_info,
    save_training_state,
    write_trainer_state,
)

logger = logging.getLogger(__name__)

CONFIG_FILE = "magic.yaml"
OUTPUTS = ("states", "reverse", "model", "trainer", "scores")
SCRATCH = ("states", "reverse")
"""What only a resume reads: deleted once the scores store is written."""


def check_options(cfg: MagicConfig) -> None:
    """Refuse what MAGIC cannot do, before anything is written."""
    from ...config.options import validate_options
    from ...models import QUANTIZED

    validate_options(cfg)
    if not cfg.data.dataset:
        raise BergsonError("--dataset is required: the training documents")
    if not cfg.query.dataset:
        raise BergsonError("--query.dataset is required: the documents whose loss is attributed")
    if cfg.data.reward_column or cfg.query.reward_column:
        raise BergsonError(
            "--reward_column: MAGIC replays a supervised fine-tune; advantage-weighted (GRPO) losses "
            "are not supported by bergson magic"
        )
    if cfg.precision in QUANTIZED:
        raise BergsonError(
            f"bergson magic --precision {cfg.precision}: MAGIC trains the model and differentiates through training, "
            "which needs the whole model in full precision in each process; drop the option"
        )


def check_precision(model: nn.Module, force: bool) -> None:
    """Refuse half-precision weights unless forced: a metagradient sums T steps of second-order
    terms, and bf16's 8-bit mantissa (fp16's 11) leaves mostly rounding noise."""
    dtype = next(model.parameters()).dtype
    if dtype in (torch.float16, torch.bfloat16) and not force:
        raise BergsonError(
            f"the model's weights are {str(dtype).removeprefix('torch.')}: metagradients in half precision "
            "are mostly rounding noise. Use --precision fp32 (or pass --force_low_precision to go on anyway)"
        )


def prepare(cfg: MagicConfig) -> tuple[nn.Module, Any, TokenizedDocs, TokenizedDocs]:
    """Load the model (fp32 unless told otherwise) and tokenize the training and query sets."""
    from ...models import load_model
    from ...runs.documents import context_size, load_docs

    check_options(cfg)
    model, tokenizer = load_model(replace(cfg, precision="fp32") if cfg.precision == "auto" else cfg)
    check_precision(model, cfg.force_low_precision)
    use_double_backward_attention(model)
    max_tokens = cfg.data.max_length or context_size(model) or 2048
    docs = load_docs(cfg.data, tokenizer, max_tokens)
    qdocs = load_docs(cfg.query, tokenizer, cfg.query.max_length or max_tokens, option="--query.dataset")
    return model, tokenizer, docs, qdocs


def query_columns(cfg: MagicConfig, num_queries: int) -> list[np.ndarray]:
    """The query rows averaged into each score column."""
    if cfg.query_mode == "aggregate":
        return [np.arange(num_queries)]
    if cfg.query_mode == "individual":
        return [np.array([j]) for j in range(num_queries)]
    raise BergsonError(f"--query_mode {cfg.query_mode!r}: choose aggregate or individual")


def load_recipe(path: str) -> MagicConfig:
    """A MAGIC config from a YAML file or from a `bergson magic` run directory."""
    from ...config import load_yaml

    p = Path(path)
    if p.is_dir():
        p = p / CONFIG_FILE
    if not p.is_file():
        raise BergsonError(
            f"--recipe {path}: neither a magic config YAML nor a run directory holding {CONFIG_FILE}"
        )
    cfg = load_yaml(MagicConfig, p)
    if not cfg.run_path and p.name == CONFIG_FILE:
        cfg = replace(cfg, run_path=str(p.parent))
    return cfg


@distributed.entry(lambda cfg: _load_scores(Path(cfg.run_path)))
@honours_numerics
def magic(cfg: MagicConfig) -> Any:
    """Train once with checkpoints, then reverse passes that carry up to ``--query_batch_size``
    score columns each; returns the scores store (rows = training documents). Every stage
    resumes where a killed run stopped.

    On several ranks (``--nproc_per_node`` or torchrun) the run is data parallel: each rank
    takes every other document of each micro-batch, in training and in the reverse passes,
    and the ranks sum their gradients (one all-reduce per step); rank 0 writes the files."""
    from ...runs.rundir import RunDir

    check_options(cfg)
    run_dir = RunDir(
        cfg,
        command="magic",
        what="a MAGIC run",
        config_file=CONFIG_FILE,
        outputs=OUTPUTS,
        ignore=("top_k", "device", "memory_budget_gb", "query_batch_size"),
        shared="rank 0 alone saves the training checkpoints and finished reverse passes there, and every "
        "rank decides from them where a run resumes, in step with the others",
    ).prepare()
    root = run_dir.root
    try:
        return _load_scores(root)
    except BergsonError:
        pass
    model, tokenizer, docs, qdocs = prepare(cfg)
    pad = tokenizer.pad_token_id or 0
    replay = Replay(model, docs, cfg.training, pad)
    run = MagicRun(replay, root, cfg.checkpoints, int(cfg.memory_budget_gb * 2**30))
    trainer_dir = root / TRAINER_DIR
    saved_steps = checkpoint_steps_to_save(cfg.save_checkpoints, run.total)
    if saved_steps:
        logger.info("magic: saving training checkpoints at steps %s in %s", saved_steps, trainer_dir)
    writer = CheckpointWriter(trainer_dir, model, tokenizer, cfg.training, saved_steps, run.total)
    timings = run_dir.timings
    start = time.perf_counter()
    final, losses = run.train(writer if saved_steps else None)
    if run.writes and "train_s" not in timings:
        size = disk_bytes(root / "states")
        timings.record(
            "train_s", start, steps=run.total, first_loss=losses[0], last_loss=losses[-1], states_bytes=size
        )
        logger.info("magic: training done; its checkpoints (states/) take %s", megabytes(size))
    if run.writes and not (root / "model" / "config.json").is_file():
        start = time.perf_counter()
        save_training_state(model, tokenizer, final, cfg.training, run.total, root / "model")
        timings.record("model_s", start, model_bytes=disk_bytes(root / "model"))
        logger.info(
            "magic: the fine-tuned model and its optimizer state (model/) take %s; optimizer.pt for "
            "--optimizer_state: %s",
            megabytes(disk_bytes(root / "model")),
            optimizer_info(cfg.training, run.total)["optimizer_state"],
        )
    if run.writes and not (trainer_dir / TRAINER_STATE).is_file():
        trainer_dir.mkdir(exist_ok=True)
        write_trainer_state(trainer_dir, cfg.training, losses, run.total)
    first_step = unrolled_from(cfg.unroll_steps, run.total)
    reverse_dir = root / "reverse"
    reverse_dir.mkdir(exist_ok=True)
    columns = query_columns(cfg, len(qdocs))
    grads: list[np.ndarray | None] = [None] * len(columns)
    for j in range(len(columns)):
        done = reverse_dir / f"column_{j}.done.npy"
        if done.is_file():
            grads[j] = np.load(done)
    pending = [j for j in range(len(columns)) if grads[j] is None]
    size = cfg.query_batch_size
    if len(pending) > 1:
        logger.info(
            "magic: %d score columns in %d reverse pass(es) of up to %d; the cotangents carried take %s per column",
            len(pending), -(-len(pending) // size), size, megabytes(run.template.nbytes()),
        )  # fmt: skip
    for i in range(0, len(pending), size):
        batch = pending[i : i + size]
        label = str(batch[0]) if len(batch) == 1 else f"{batch[0]}-{batch[-1]}"
        progress = reverse_dir / f"columns_{label}.progress.safetensors"
        start = time.perf_counter()
        cots = [query_gradient(model, final.params, qdocs.select(columns[j]), pad) for j in batch]
        result = run.reverse(cots, progress, first_step)
        for k, j in enumerate(batch):
            grads[j] = result.token_grads[:, k]
        if not run.writes:
            continue
        for k, j in enumerate(batch):
            buf = io.BytesIO()
            np.save(buf, result.token_grads[:, k])
            atomic_write_bytes(reverse_dir / f"column_{j}.done.npy", buf.getvalue())
        timings.record(
            f"reverse_{label}_s",
            start,
            replayed_steps=result.replayed_steps,
            graph_steps=result.graph_steps,
            peak_states_in_memory=result.peak_states_in_memory,
            **{f"reverse_{label}_columns": len(batch)},
            **{
                f"reverse_{label}_bytes": sum(
                    (reverse_dir / f"column_{j}.done.npy").stat().st_size for j in batch
                )
            },
        )
        _delete(progress, f"reverse_{label}_progress", timings, f"column(s) {label} done")
    if run.writes:  # progress of a pass killed under another --query_batch_size: its columns are done
        for stale in sorted(reverse_dir.glob("columns_*.progress.safetensors")):
            _delete(stale, "reverse_stale_progress", timings, "its columns are done")
    token_scores = -np.stack(
        [g for g in grads if g is not None], 1
    )  # positive: up-weighting the token lowers the query loss

    def finish() -> None:
        start = time.perf_counter()
        _save_scores(cfg, root / "scores", model, replay, token_scores, run.total)
        for name in SCRATCH:
            _delete(root / name, name, timings, "the scores store is written: no resume reads it")
        timings.record(
            "scores_s", start, scores_bytes=disk_bytes(root / "scores"), run_bytes=disk_bytes(root)
        )
        logger.info(
            "magic: the scores (scores/) take %s; the run directory %s holds %s",
            megabytes(timings["scores_bytes"]), root, megabytes(timings["run_bytes"]),
        )  # fmt: skip

    distributed.on_rank_zero(finish, f"writing the scores at {root / 'scores'}")
    distributed.barrier("the end of the run")
    return _load_scores(root)


def unrolled_from(unroll_steps: int, total: int) -> int:
    """The first step a truncated reverse pass differentiates through (0: all of them)."""
    if not unroll_steps or unroll_steps >= total:
        if unroll_steps > total:
            logger.warning(
                "magic: --unroll_steps %d exceeds the run's %d steps: unrolling all of them",
                unroll_steps,
                total,
            )
        return 0
    logger.warning(
        "magic: --unroll_steps %d: differentiating through steps %d..%d of %d only; training before "
        "step %d is held fixed (recorded in the scores' manifest)",
        unroll_steps, total - unroll_steps + 1, total, total, total - unroll_steps + 1,
    )  # fmt: skip
    return total - unroll_steps


def _delete(path: Path, label: str, timings: Any, why: str) -> None:
    """Delete a file or directory a resume no longer reads, saying so and recording its bytes
    as ``deleted_<label>_bytes`` in timings.json."""
    if not path.exists():
        return
    start = time.perf_counter()
    size = disk_bytes(path)
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    logger.info("magic: deleted %s (%s): %s", path.name, megabytes(size), why)
    timings.record("cleanup_s", start, **{f"deleted_{label}_bytes": size})  # the last deletion's seconds


def _save_scores(
    cfg: MagicConfig, path: Path, model: nn.Module, replay: Replay, token_scores: np.ndarray, steps: int
) -> None:
    """The scores store: one row per training document (its tokens' scores summed), and the
    tokens' own scores with ``--per_token``."""
    from ...config import IndexConfig
    from ...runs.manifests import make_manifest
    from ...store.scores import save_score_matrix

    layout = replay.layout
    tokens = np.split(token_scores, layout.offsets[1:-1]) if cfg.per_token else None
    base = make_manifest(
        IndexConfig(model=cfg.model, revision=cfg.revision, data=cfg.data, projection_dim=0),
        model,
        {},
        replay.docs,
        int(layout.lengths.max()),
    )
    info = {
        "kind": "magic",
        "mode": cfg.query_mode,
        "query_dataset": cfg.query.dataset,
        "checkpoints": cfg.checkpoints,
        "unrolled_steps": min(cfg.unroll_steps, steps) if cfg.unroll_steps else steps,
        "training": {"steps": steps, **dict(vars(cfg.training))},
        "unit_normalize": False,
        "meaning": "-d(mean query loss after training)/d(document weight)",
    }
    scores = layout.per_document(token_scores)
    save_score_matrix(path, scores, base, info, overwrite=True, tokens=tokens)


def _load_scores(root: Path) -> Any:
    from ...store import load_gradients

    return load_gradients(root / "scores")
