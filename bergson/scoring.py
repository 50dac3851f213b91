"""``bergson score``: the collection loop with an in-memory scorer as its sink.

Every document's gradient is compared with query vectors held in memory, and only the
scores are written (a scores store: rows x score columns). Scores are gradient inner
products (cosines with ``unit_normalize``), oriented so that positive means training on
the row lowers the query's loss.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any, cast

import numpy as np
import torch

from . import distributed
from .config import DataConfig, ScoreConfig, save_yaml
from .config.options import COMPUTING, unused_with
from .core.devices import resolve_device
from .core.layout import ModuleLayout
from .core.rows import row_norms, unit_rows
from .core.sinks import WriterSink
from .data import TokenizedDocs, load_data, plan_shards
from .errors import BergsonError
from .models import announce_coverage, find_tracked_modules, numerics
from .runs.documents import prepare_inputs
from .runs.manifests import make_manifest, resolve_normalizers
from .runs.shared_store import collect_with, finish_shared_store, open_shared_store, store_here
from .store import GradientStore, Manifest, StoreWriter, load_gradients
from .store.manifest import SCORE_ORIENTATION, check_compatible
from .store.scores import pad_token_rows
from .transforms.normalizers import NORMALIZERS_FILE, load_normalizers
from .transforms.preconditioners import (
    carried,
    fixed_preconditioner,
    is_sharded,
    load_owned,
    plan_powers,
    resolve_preconditioner,
)

Transform = Callable[[torch.Tensor], torch.Tensor]

logger = logging.getLogger(__name__)


def query_matrix(
    cfg: ScoreConfig, query: GradientStore, transform: Transform | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Query vectors [nq, D] (float32), aggregated as asked, and group ids for --score max.

    ``transform`` (the preconditioner power still missing on the query side) is applied
    before unit normalization and aggregation.
    """
    q = torch.from_numpy(np.array(query.all, np.float32))
    if len(q) == 0:
        raise BergsonError(f"--query_path {cfg.query_path}: the query store has no rows")
    if transform is not None:
        q = transform(q)
    if cfg.unit_normalize:
        q = unit_rows(q)
    if cfg.aggregation != "none":
        q = q.mean(0, keepdim=True) if cfg.aggregation == "mean" else q.sum(0, keepdim=True)
    groups = None
    if cfg.query_group_column:
        if cfg.score != "max":
            raise BergsonError("--query_group_column goes with --score max")
        if cfg.aggregation != "none" or query.manifest.kind != "gradients":
            raise BergsonError("--query_group_column needs a per-row query store and --aggregation none")
        qdata = DataConfig.from_manifest(query.manifest.data)
        ds = load_data(qdata, option="query store dataset")
        if cfg.query_group_column not in ds.column_names:
            raise BergsonError(
                f"--query_group_column {cfg.query_group_column!r}: not a column of the query dataset "
                f"({', '.join(ds.column_names)})"
            )
        labels = np.asarray(ds[cfg.query_group_column])[query.rows["row_id"]]
        _, groups = np.unique(labels, return_inverse=True)
    return q.numpy(), groups


def score_columns(cfg: ScoreConfig, num_queries: int) -> int:
    return num_queries if cfg.score == "individual" else 1


class ScoreSink(WriterSink):
    """Turns per-row gradient vectors into scores against in-memory queries, then writes them."""

    def __init__(
        self,
        writer: StoreWriter,
        queries: np.ndarray,
        mode: str,
        *,
        groups: np.ndarray | None = None,
        unit_normalize: bool = False,
        device: torch.device | str = "cpu",
        transform: Transform | None = None,
    ):
        self.writer = writer
        self.q = torch.from_numpy(np.ascontiguousarray(queries, np.float32)).to(device)
        self.mode = mode
        self.groups = None if groups is None else torch.from_numpy(groups).to(device)
        self.unit = unit_normalize
        self.device = device
        self.transform = transform

    def _columns(self, s: torch.Tensor) -> torch.Tensor:
        """Raw scores [..., nq] -> the score columns of --score (mean, or per group for max)."""
        if self.mode == "mean":
            return s.mean(-1, keepdim=True)
        if self.mode == "max" and self.groups is not None:
            n = int(self.groups.max()) + 1
            sums = torch.zeros(*s.shape[:-1], n, device=s.device).index_add_(-1, self.groups, s)
            return sums / torch.bincount(self.groups, minlength=n).clamp(min=1)
        return s

    def scores(
        self, vectors: np.ndarray | torch.Tensor, tokens: np.ndarray | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Score columns of rows [B, D] and, given their token rows [B, S, D], each token's share
        (with --score max: its share of the winning query or group)."""
        v = torch.as_tensor(np.array(vectors, np.float32) if isinstance(vectors, np.ndarray) else vectors)
        v = v.to(self.device, torch.float32)
        t = None if tokens is None else torch.from_numpy(np.asarray(tokens, np.float32)).to(self.device)
        if self.transform is not None:
            v = self.transform(v)
            if t is not None:
                t = self.transform(t.reshape(-1, t.shape[-1])).reshape(t.shape)
        if self.unit:
            norm = row_norms(v)
            v = v / norm
            t = None if t is None else t / norm[:, None]
        s = self._columns(v @ self.q.T)  # [B, columns]
        st = None if t is None else self._columns(t @ self.q.T)  # [B, S, columns]
        if self.mode == "max":
            best = s.argmax(1, keepdim=True)
            s = s.gather(1, best)
            if st is not None:
                st = st.gather(2, best[:, None].expand(-1, st.shape[1], 1))
        return s, st

    def write(self, row_ids, vectors, num_tokens, losses, tokens=None) -> None:  # types: Sink.write
        s, st = self.scores(vectors, tokens)
        self.writer.write(
            row_ids, s.cpu().numpy(), num_tokens, losses, None if st is None else st.cpu().numpy()
        )


def scores_manifest(base: Manifest, cfg: ScoreConfig, query: GradientStore, ncols: int) -> Manifest:
    """A scores store's manifest: the training side's provenance, one 'scores' block of columns."""
    return replace(
        base,
        kind="scores",
        status="in_progress",
        modules=[ModuleLayout("scores", "scores", [ncols], False, 0, ncols)],
        dtype="float32",
        aggregation="none",
        unit_normalize=cfg.unit_normalize,
        score={
            "mode": cfg.score,
            "columns": ncols,
            "query_path": str(query.root),
            "query_rows": len(query),
            "query_aggregation": cfg.aggregation,
            "query_group_column": cfg.query_group_column,
            "query_modules": [m.name for m in query.manifest.modules],
            "orientation": SCORE_ORIENTATION,
            "unit_normalize": cfg.unit_normalize,
            "index": cfg.index,
        },
    )


def preconditioning(
    cfg: ScoreConfig, query: GradientStore, index: GradientStore | None, layout: Manifest
) -> tuple[Transform | None, Transform | None, dict[str, Any] | None]:
    """(training-side transform, query-side transform, manifest entry) so that the scores use
    the preconditioner exactly once, whatever the stores already carry."""
    stores = [("--query_path", query)] + ([("--index", index)] if index is not None else [])
    pre = None
    carried_by_none = fixed_preconditioner(stores) is None and not any(
        s.manifest.preconditioner for _, s in stores
    )
    if cfg.preconditioner_path and carried_by_none:
        if not cfg.unit_normalize:  # H^-1 on the query side only: each worker applies its own blocks
            pre = load_owned(cfg.preconditioner_path, query.manifest.modules, "--preconditioner_path")
        elif distributed.world_size() > 1 and is_sharded(cfg.preconditioner_path):
            logger.warning(
                "--preconditioner_path %s is sharded, and cosine scores (--unit_normalize) apply H^-1/2 to "
                "every training batch: each worker loads the whole of it",
                cfg.preconditioner_path,
            )
    pre = pre or resolve_preconditioner(cfg.preconditioner_path, stores)
    if pre is None:
        return None, None, fixed_preconditioner(stores, cfg.unit_normalize)
    pre.check(layout, "the scored vectors")
    train_power = carried(index.manifest) if index is not None else 0.0
    query_power = carried(query.manifest)
    extra_t, extra_q = plan_powers(train_power, query_power, cfg.unit_normalize)
    info = {**pre.info(-1.0), "applied_train": extra_t, "applied_query": extra_q}
    info["scores_use"] = "H^-1/2 on each side (cosine)" if cfg.unit_normalize else "H^-1 between the sides"
    t = pre.transform(extra_t, layout.modules) if extra_t else None
    q = pre.transform(extra_q, query.manifest.modules) if extra_q else None
    return t, q, info


def _from_existing_index(cfg: ScoreConfig, query: GradientStore, unused: list[str]) -> None:
    index = load_gradients(cfg.index or "")
    check_compatible(index.manifest, query.manifest, f"--index {cfg.index}", f"--query_path {cfg.query_path}")
    if index.manifest.kind != "gradients":
        raise BergsonError(
            f"--index {cfg.index}: expected a per-row gradient store, found a {index.manifest.kind} store"
        )
    if cfg.per_token and not index.has_tokens:
        raise BergsonError(
            f"--per_token with --index {cfg.index}: the store has no token rows; rebuild it with "
            "bergson build --per_token, or score the dataset itself"
        )
    t, qt, info = preconditioning(cfg, query, index, index.manifest)
    q, groups = query_matrix(cfg, query, qt)
    manifest = scores_manifest(index.manifest, cfg, query, score_columns(cfg, len(q)))
    manifest.per_token = cfg.per_token
    manifest.plan = {"source": "index", "shard_size": len(index)}
    manifest.producer = {**manifest.producer, "unused_options": unused}
    manifest.preconditioner = info
    writer = StoreWriter(cfg.run_path, manifest, overwrite=cfg.overwrite)
    if writer.complete:
        return
    save_yaml(cfg, writer.root / "config.yaml")
    sink = ScoreSink(writer, q, cfg.score, groups=groups, unit_normalize=cfg.unit_normalize, transform=t)
    sink.begin_shard(0, range(len(index)))
    for start, block in index.blocks(256 if cfg.per_token else 8192):
        rows = index.rows[start : start + len(block)]
        tokens = None
        if cfg.per_token:
            tokens = pad_token_rows([index.token_rows(start + b) for b in range(len(block))], block.shape[1])
        sink.write(np.arange(start, start + len(block)), block, rows["num_tokens"], rows["loss"], tokens)
    sink.end_shard(0)
    # keep the index's dataset row ids (they equal positions for stores written by build)
    writer.finalize(1)


@distributed.entry(
    lambda cfg: load_gradients(cfg.run_path),
    alone=lambda cfg: (
        "bergson score --index (scoring a store, with no gradients to compute)" if cfg.index else None
    ),
)
def score(cfg: ScoreConfig) -> GradientStore:
    """Score a dataset (or an existing gradient store) against a query store (a dataset on
    ``cfg.nproc_per_node`` workers, or on the ranks of a torchrun launch).

    On a rank of a several-machine launch that does not see rank 0's ``run_path`` (no shared
    filesystem) it returns None: the scores are on rank 0's machine."""
    if not cfg.query_path:
        raise BergsonError("--query_path is required: a store from `bergson build` or `bergson reduce`")
    if cfg.top_k < 0:
        raise BergsonError(f"--top_k {cfg.top_k}: must be >= 0")
    query = load_gradients(cfg.query_path)
    if cfg.index:
        if not cfg.run_path:
            raise BergsonError("run_path is required: the output directory of the scores")
        unused = unused_with(cfg, "--index", COMPUTING, "the vectors of the store are scored as they are")
        _from_existing_index(cfg, query, unused)
        return load_gradients(cfg.run_path)

    with numerics(cfg):
        model, tokenizer, docs, max_tokens = prepare_inputs(cfg)
        store = score_documents(cfg, model, docs, max_tokens, query, tokenizer.pad_token_id)
        return cast(GradientStore, store)  # None only on such a node-local rank


def score_documents(
    cfg: ScoreConfig,
    model: torch.nn.Module,
    docs: TokenizedDocs,
    max_tokens: int,
    query: GradientStore,
    pad_token_id: int | None = None,
) -> GradientStore | None:
    """One collection pass over tokenized documents, scoring each against the query store; returns
    the scores store (None on a rank that wrote a node-local copy: it is on rank 0's machine)."""
    modules = find_tracked_modules(
        model, cfg.modules, include_output_head=cfg.include_output_head, track_experts=cfg.tracked_experts()
    )
    norm_path = query.root / NORMALIZERS_FILE
    carried_norms = load_normalizers(norm_path) if norm_path.is_file() else None
    # an explicit --optimizer_state or --whitening must agree with the query's normalizers (checked below)
    given = cfg.optimizer_state or cfg.whitening
    normalizers = resolve_normalizers(cfg, model, modules) if given else carried_norms
    base = make_manifest(
        replace(cfg, aggregation="none", unit_normalize=False), model, modules, docs, max_tokens, normalizers
    )
    if distributed.rank() == 0:
        announce_coverage(base.model)
    check_compatible(base, query.manifest, "the scored model", f"--query_path {cfg.query_path}")
    t, qt, info = preconditioning(cfg, query, None, base)
    q, groups = query_matrix(cfg, query, qt)
    manifest = scores_manifest(base, cfg, query, score_columns(cfg, len(q)))
    manifest.preconditioner = info
    writer = open_shared_store(cfg, manifest, lambda w: save_yaml(cfg, w.root / "config.yaml"))
    if not writer.complete:
        device = resolve_device(cfg.device)
        sink = ScoreSink(
            writer, q, cfg.score, groups=groups, unit_normalize=cfg.unit_normalize, device=device, transform=t
        )
        collect_with(cfg, model, docs, modules, sink, normalizers, pad_token_id, per_token=cfg.per_token)
        finish_shared_store(writer, len(plan_shards(len(docs), cfg.shard_size)))
    return store_here(writer)
