"""The store a run writes, and the collection pass that fills it, on one process or on the
ranks of a launch: rank 0 creates the store, every rank takes its share of the shards still to
do, ranks that do not see rank 0's directory write node-local copies whose shards are sent to
rank 0 at the end, and rank 0 marks the store complete. :func:`write_store` is that whole pass
with the store writer as its sink (``bergson build``, and TrackStar's stores)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import distributed
from ..collect.loop import collect_gradients
from ..config import IndexConfig, save_yaml
from ..core.sinks import Sink
from ..data import TokenizedDocs, assign_shards, plan_shards
from ..errors import BergsonError
from ..models import announce_coverage, find_tracked_modules, head_splits
from ..store import GradientStore, Manifest, StoreWriter, load_gradients
from ..store.writer import TOKENS, shard_name
from ..transforms.normalizers import NORMALIZERS_FILE, Normalizer, save_normalizers
from ..transforms.preconditioners import STORE_DIR as PRECONDITIONER_DIR
from ..transforms.preconditioners import resolve_preconditioner
from .documents import token_budget
from .manifests import make_manifest, resolve_normalizers

logger = logging.getLogger(__name__)


def batch_budget(cfg: IndexConfig, model: torch.nn.Module) -> int:
    """The batches' token budget: ``--token_batch_size``, with ``auto`` resolved for this model and
    device (:func:`bergson.runs.documents.token_budget` records the choice on ``cfg``)."""
    if isinstance(cfg.token_batch_size, str):
        token_budget(cfg, model)
    return int(cfg.token_batch_size)


def collect_with(
    cfg: IndexConfig,
    model: torch.nn.Module,
    docs: TokenizedDocs,
    modules: Mapping[str, torch.nn.Module],
    sink: Sink,
    normalizers: Mapping[str, Normalizer] | None,
    pad_token_id: int | None,
    *,
    unit_normalize: bool = False,
    transform: Any = None,
    per_token: bool = False,
) -> None:
    """The collection loop with the projection, batching and loss options of ``cfg``, over this
    rank's share of the shards (all of them in a single process)."""
    collect_gradients(
        model,
        docs,
        sink=sink,
        modules=modules,
        projection_dim=cfg.projection_dim,
        seed=cfg.projection_seed,
        include_bias=cfg.include_bias,
        normalizers=normalizers,
        token_batch_size=batch_budget(cfg, model),
        loss_reduction=cfg.loss_reduction,
        unit_normalize=unit_normalize,
        shard_size=cfg.shard_size,
        pad_token_id=pad_token_id or 0,
        transform=transform,
        heads=head_splits(model, modules, cfg.attention_heads),
        per_token=per_token,
        aggregate_experts=cfg.aggregate_experts,
        only_shards=rank_shards(cfg, docs, sink),
        progress=distributed.rank() == 0,
    )


def rank_shards(cfg: IndexConfig, docs: TokenizedDocs, sink: Sink) -> list[int] | None:
    """This rank's shards (None in a single process): the shards complete nowhere are still to
    do, and every rank splits those the same way, balancing token counts (:func:`assign_shards`).
    Rank 0 says which shards are complete; when some ranks write node-local copies of the store
    (:func:`open_shared_store`), those report theirs too, and a shard complete on any rank counts."""
    world, me = distributed.world_size(), distributed.rank()
    if world == 1:
        return None
    shards = plan_shards(len(docs), cfg.shard_size)
    writer = sink if isinstance(sink, StoreWriter) else getattr(sink, "writer", None)
    if isinstance(writer, StoreWriter) and writer.local_ranks:
        looks = me == 0 or writer.node_local  # ranks that share rank 0's directory have nothing to add
        reported = distributed.all_gather_objects([i for i in range(len(shards)) if looks and sink.done(i)])
        done = set().union(*reported)
        todo = [i for i in range(len(shards)) if i not in done]
        elsewhere = len(done - set(reported[0]))
        if me == 0 and elsewhere:
            logger.info(
                "%d complete shard(s) are only in node-local copies; they are sent here at the end", elsewhere
            )
    else:
        todo = distributed.broadcast([i for i in range(len(shards)) if not sink.done(i)])
    if me == 0 and len(todo) < len(shards):
        logger.info("%d of %d shards already complete; resuming", len(shards) - len(todo), len(shards))
    active = np.where(docs.num_loss_tokens() > 0, docs.lengths, 0)
    costs = [int(active[shards[i].start : shards[i].stop].sum()) for i in todo]
    share = assign_shards(costs, world)[me]
    logger.info(
        "rank %d of %d: %d of %d shards, %s of %s tokens",
        me,
        world,
        len(share),
        len(todo),
        f"{sum(costs[j] for j in share):,}",
        f"{sum(costs):,}",
    )
    if not share and todo:
        logger.warning(
            "rank %d has no shard: %d shards for %d ranks (try a smaller --shard_size)", me, len(todo), world
        )
    return [todo[j] for j in share]


def open_shared_store(
    cfg: IndexConfig, manifest: Manifest, setup: Callable[[StoreWriter], None] | None = None
) -> StoreWriter:
    """The store at ``cfg.run_path``: rank 0 creates or validates it and, unless it is complete,
    runs ``setup(writer)`` (config and side files) while the other ranks wait; they then open it.

    A rank that does not see rank 0's directory (a machine without a filesystem shared with
    rank 0's: it does not find the launch marker rank 0 leaves there) writes into a copy of its
    own at ``cfg.run_path`` on its machine, whose shards :func:`finish_shared_store` sends to
    rank 0. ``writer.local_ranks`` lists such ranks, on every rank."""

    def create() -> StoreWriter:
        writer = StoreWriter(
            cfg.run_path, manifest, overwrite=cfg.overwrite, foreign_files=(distributed.LAUNCH_MARKER,)
        )
        if setup is not None and not writer.complete:
            setup(writer)
        return writer

    if distributed.world_size() == 1:
        return create()
    me = distributed.rank()
    writer = distributed.on_rank_zero(create, f"preparing the store at {cfg.run_path}")
    complete = distributed.broadcast(None if writer is None else writer.complete)
    local_ranks = distributed.node_local_ranks(cfg.run_path)
    local, error = me in local_ranks, None
    if me != 0:
        try:
            if not local:
                writer = StoreWriter(cfg.run_path, manifest, create=False)
            elif complete:
                writer = StoreWriter.complete_elsewhere(cfg.run_path, manifest)
            else:
                writer = StoreWriter(
                    cfg.run_path,
                    manifest,
                    overwrite=cfg.overwrite,
                    node_local=True,
                    foreign_files=(distributed.LAUNCH_MARKER,),
                )
                logger.info(
                    "rank %d does not see rank 0's store: it writes its shards node-locally into %s "
                    "and sends them to rank 0 at the end",
                    me,
                    Path(cfg.run_path).resolve(),
                )
        except (BergsonError, OSError) as e:
            where = f" (it does not see rank 0's store; its own copy: {Path(cfg.run_path).resolve()})"
            error = BergsonError(f"rank {me}{where if local else ''}: {e}")
    reports = distributed.all_gather_objects(None if error is None else str(error))
    if error is not None:
        raise error
    failed = [(r, message) for r, message in enumerate(reports) if message]
    if failed:
        raise distributed.PeerError(f"rank {failed[0][0]} could not open the store ({failed[0][1]})")
    assert writer is not None
    writer.local_ranks = local_ranks
    if me == 0 and writer.local_ranks and not writer.complete:
        logger.info(
            "rank(s) %s do not see %s: they write node-local copies and send their shards here at the end",
            ", ".join(map(str, writer.local_ranks)),
            writer.root.resolve(),
        )
    return writer


def gather_node_local_shards(writer: StoreWriter, num_shards: int) -> None:
    """Send rank 0 every complete shard its directory lacks from the node-local copies (for each
    shard one sender, the lowest rank that has it). Collective; every rank passes its writer.

    The files go over the process group in chunks (:func:`distributed.send_files`); rank 0 writes
    each to a temporary name, fsyncs and renames it, the rows' metadata (and token rows) first
    and the vectors (``.npy``, which marks a shard complete) last."""
    me = distributed.rank()
    looks = me == 0 or writer.node_local
    reported = distributed.all_gather_objects([i for i in range(num_shards) if looks and writer.done(i)])
    have = [set(r) for r in reported]
    plan = []
    for i in range(num_shards):
        senders = [r for r in writer.local_ranks if i in have[r]]  # local_ranks ascend
        if i not in have[0] and senders:
            plan.append((i, senders[0]))
    if me == 0 and plan:
        logger.info("receiving %d shard(s) from node-local ranks", len(plan))
    for i, src in plan:
        base = writer.root / shard_name(i)
        paths = [base.with_suffix(".rows.parquet"), base.with_suffix(TOKENS), base.with_suffix(".npy")]
        if me == src:
            distributed.send_files(paths, dst=0)
        elif me == 0:
            _place_shard(writer, i, paths, distributed.recv_files(paths, src), src)


def _place_shard(
    writer: StoreWriter, index: int, paths: list[Path], got: list[Path | None], src: int
) -> None:
    """Rename a received shard's files into place, the vectors last; a shard that came without its
    rows' metadata (or token rows, in a per-token store) stays missing."""
    rows, tokens, vectors = got
    per_token = writer.manifest.per_token and not writer.aggregate
    if rows is None or vectors is None or (per_token and tokens is None):
        for tmp in got:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        logger.warning("rank %d sent shard %d without all of its files; it stays missing", src, index)
        return
    for tmp, path in zip(got, paths):
        if tmp is not None:
            tmp.replace(path)


def finish_shared_store(writer: StoreWriter, num_shards: int) -> None:
    """Once every rank has written its shards, the node-local ones (if any) are sent to rank 0,
    which marks the store complete (the others wait)."""
    distributed.barrier("the end of the pass (every rank's shards written)")
    if writer.local_ranks:
        gather_node_local_shards(writer, num_shards)
        if writer.node_local:
            logger.info(
                "rank %d has sent rank 0 the shards it lacked; this node-local partial copy at %s is "
                "kept (a rerun resumes from it) and may be deleted once rank 0's store is complete",
                distributed.rank(),
                writer.root.resolve(),
            )
    distributed.on_rank_zero(lambda: writer.finalize(num_shards), f"finalizing {writer.root}")


def store_here(writer: StoreWriter) -> GradientStore | None:
    """The finished store as this rank sees it: None on a rank that wrote a node-local copy
    (the store is on rank 0's machine)."""
    return None if writer.node_local else load_gradients(writer.root)


def write_store(
    cfg: IndexConfig,
    model: torch.nn.Module,
    docs: TokenizedDocs,
    max_tokens: int,
    pad_token_id: int | None = None,
    normalizers: Mapping[str, Normalizer] | None = None,
) -> GradientStore | None:
    """Run the collection loop over tokenized documents into the store at ``cfg.run_path``; returns
    it (None on a rank that wrote a node-local copy: the store is on rank 0's machine)."""
    modules = find_tracked_modules(
        model, cfg.modules, include_output_head=cfg.include_output_head, track_experts=cfg.tracked_experts()
    )
    normalizers = resolve_normalizers(cfg, model, modules, normalizers)
    manifest = make_manifest(cfg, model, modules, docs, max_tokens, normalizers)
    if distributed.rank() == 0:
        announce_coverage(manifest.model)
    pre = resolve_preconditioner(cfg.preconditioner_path, [])
    transform = None
    if pre is not None:
        pre.check(manifest, f"the store at {cfg.run_path}")
        manifest.preconditioner = pre.info(-0.5)
        transform = pre.transform(-0.5, manifest.modules)

    def setup(writer: StoreWriter) -> None:
        save_yaml(cfg, writer.root / "config.yaml")
        if normalizers:
            save_normalizers(writer.root / NORMALIZERS_FILE, normalizers)
        if pre is not None:
            pre.save(writer.root / PRECONDITIONER_DIR)

    writer = open_shared_store(cfg, manifest, setup)
    if writer.complete:
        if not writer.node_local:
            logger.info("%s is already complete; nothing to do (pass --overwrite to rebuild)", cfg.run_path)
        return store_here(writer)
    collect_with(
        cfg,
        model,
        docs,
        modules,
        writer,
        normalizers,
        pad_token_id,
        unit_normalize=cfg.unit_normalize,
        transform=transform,
        per_token=cfg.per_token,
    )
    finish_shared_store(writer, len(plan_shards(len(docs), cfg.shard_size)))
    return store_here(writer)
