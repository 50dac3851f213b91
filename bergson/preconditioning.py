"""``bergson preconditioner``: the collection loop with a statistics sink, or a mix of two fits."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .config import PreconditionerConfig, save_yaml, to_dict
from .config.options import COMPUTING, ModelOptions, is_default, unused_with, validate_options
from .core.devices import resolve_device
from .core.files import megabytes
from .data import TokenizedDocs
from .errors import BergsonError
from .models import announce_coverage, find_tracked_modules, honours_numerics
from .runs.documents import prepare_inputs, subsample
from .runs.manifests import make_manifest, resolve_normalizers
from .runs.rundir import check_saved_config
from .runs.shared_store import collect_with
from .store import load_gradients
from .transforms.normalizers import Normalizer
from .transforms.preconditioners import (
    META_FILE,
    PART_GLOB,
    TENSORS_FILE,
    Preconditioner,
    StatisticsSink,
    is_complete,
    layout_of,
    load_preconditioner,
    mix_preconditioners,
    part_file,
    second_moments_of_store,
    shard_owners,
    sharded_identity,
)

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"


def fit_on_documents(
    cfg: Any,
    model: torch.nn.Module,
    modules: Mapping[str, torch.nn.Module],
    docs: TokenizedDocs,
    max_tokens: int,
    pad_token_id: int | None,
    normalizers: Mapping[str, Normalizer] | None = None,
    *,
    damping: float,
    damping_mode: str,
    source: dict[str, Any] | None = None,
    shard: bool = False,
) -> Preconditioner:
    """Second moments of the documents' (normalized, projected) gradients, eigendecomposed (with
    several ranks: each collects its shards' moments, then one sum over ranks; with ``shard``,
    each module's sum goes to its owner (:func:`shard_owners`) alone, and each rank's result
    holds only its own modules)."""
    layout = make_manifest(cfg, model, modules, docs, max_tokens, normalizers)
    if distributed.rank() == 0:
        announce_coverage(layout.model)
    dims = {m.name: m.dim for m in layout.modules}
    sink = StatisticsSink(dims, resolve_device(cfg.device))
    collect_with(cfg, model, docs, modules, sink, normalizers, pad_token_id)
    if shard and distributed.world_size() > 1:
        owners = shard_owners(dims, distributed.world_size())
        if distributed.rank() == 0:
            counts = [sum(r == k for r in owners.values()) for k in range(distributed.world_size())]
            logger.info("--shard_preconditioners: modules per rank %s", counts)
        sink.reduce_to_owners(owners)
    else:
        sink.all_reduce()
    return sink.preconditioner(layout_of(layout), damping, damping_mode, source)


def _statistics_bytes(dims: Mapping[str, int], owned: Sequence[str]) -> int:
    """The most bytes of statistics a rank holds: every module's float32 sum while collecting,
    then its own modules' float32 sums, float64 second moments and eigenvectors."""
    return max(4 * sum(d * d for d in dims.values()), 20 * sum(dims[n] ** 2 for n in owned))


def _peak_rss() -> int:
    import resource
    import sys

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _existing(cfg: PreconditionerConfig) -> Preconditioner | None:
    """A complete earlier fit with the same options (None when there is none, or --overwrite)."""
    root = Path(cfg.run_path)
    if cfg.overwrite or not is_complete(root):
        return None
    check_saved_config(cfg, root / CONFIG_FILE, "a preconditioner")
    return load_preconditioner(root)


def _single_process(cfg: PreconditionerConfig) -> str | None:
    if cfg.mix_train or cfg.mix_query:
        return "mixing preconditioners (--mix_train/--mix_query)"
    return "fitting on a store (--index)" if cfg.index else None


@distributed.entry(lambda cfg: load_preconditioner(cfg.run_path), alone=_single_process)
@honours_numerics
def fit_preconditioner(
    cfg: PreconditionerConfig, normalizers: Mapping[str, Normalizer] | None = None
) -> Preconditioner:
    """Fit a preconditioner on a dataset or a store (or mix two) and save it at ``cfg.run_path``."""
    if not cfg.run_path:
        raise BergsonError("run_path is required: the output directory of the preconditioner")
    validate_options(cfg)
    if not (cfg.mix_train or cfg.mix_query) and not is_default(cfg, "downweight_components"):
        raise BergsonError(
            f"--downweight_components {cfg.downweight_components}: it sets how two preconditioners are "
            "mixed, and none are (--mix_train/--mix_query); drop the option"
        )
    # rank 0 decides and every rank gets its fit: a rank on another machine may not see rank 0's
    # run_path (no shared filesystem), and all ranks must agree to skip the collection pass
    found = distributed.broadcast(
        distributed.on_rank_zero(lambda: _existing(cfg), f"checking {cfg.run_path}")
    )
    if found is not None:
        logger.info("%s is already complete; nothing to do (pass --overwrite to refit)", cfg.run_path)
        return found
    if cfg.shard_preconditioners and _single_process(cfg):
        logger.warning(
            "--shard_preconditioners: %s runs in one process; nothing to shard", _single_process(cfg)
        )
    if cfg.mix_train or cfg.mix_query:
        if not (cfg.mix_train and cfg.mix_query):
            raise BergsonError("--mix_train and --mix_query go together: the two preconditioners to mix")
        if cfg.index or cfg.data.dataset:
            raise BergsonError("mixing reads two fitted preconditioners; drop --index and --dataset")
        mixed = mix_preconditioners(
            load_preconditioner(cfg.mix_train, "--mix_train"),
            load_preconditioner(cfg.mix_query, "--mix_query"),
            cfg.downweight_components,
        )
        pre = replace(mixed, damping=cfg.damping, damping_mode=cfg.damping_mode)
    elif cfg.index:
        if cfg.data.dataset:
            raise BergsonError("give either --index or --dataset, not both")
        store = load_gradients(cfg.index)
        unused = tuple(g for g in COMPUTING if g is not ModelOptions)  # --device still places the fit
        ignored = unused_with(cfg, "--index", unused, "the second moments are those of the store's vectors")
        if store.manifest.kind != "gradients" or store.manifest.preconditioner:
            raise BergsonError(
                f"--index {cfg.index}: needs a per-row gradient store without a preconditioner "
                f"(found kind {store.manifest.kind!r}, preconditioner {store.manifest.preconditioner})"
            )
        if store.manifest.unit_normalize:
            logger.warning("%s holds unit-normalized vectors; the second moment is of those", cfg.index)
        moments, count = second_moments_of_store(store, resolve_device(cfg.device))
        pre = Preconditioner(
            moments,
            num_rows=count,
            layout=layout_of(store.manifest),
            damping=cfg.damping,
            damping_mode=cfg.damping_mode,
            source={"index": str(store.root), "rows": len(store), "unused_options": ignored},
        )
    else:
        model, tokenizer, docs, max_tokens = prepare_inputs(cfg)
        docs, _ = subsample(docs, cfg.max_documents, cfg.sample_seed)
        modules = find_tracked_modules(
            model,
            cfg.modules,
            include_output_head=cfg.include_output_head,
            track_experts=cfg.tracked_experts(),
        )
        norms = resolve_normalizers(cfg, model, modules, normalizers)
        source = {**to_dict(cfg.data), "documents": len(docs), "sample_seed": cfg.sample_seed}
        sharded = _sharded(cfg)
        pre = fit_on_documents(
            cfg,
            model,
            modules,
            docs,
            max_tokens,
            tokenizer.pad_token_id,
            norms,
            damping=cfg.damping,
            damping_mode=cfg.damping_mode,
            source=source,
            shard=sharded,
        )
        if sharded:
            _save_sharded(cfg, pre)
            return pre
    root = Path(cfg.run_path)

    def save() -> None:
        root.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, root / CONFIG_FILE)
        pre.save(root)

    distributed.on_rank_zero(save, f"saving the preconditioner at {root}")
    return pre


def _sharded(cfg: PreconditionerConfig) -> bool:
    """Whether this fit shards its blocks over the ranks (--shard_preconditioners, several ranks)."""
    if not cfg.shard_preconditioners:
        return False
    if distributed.world_size() == 1:
        logger.warning("--shard_preconditioners: one process; nothing to shard (every block is fitted here)")
        return False
    from .distributed.transfer import require_shared_directory

    Path(cfg.run_path).mkdir(parents=True, exist_ok=True)
    require_shared_directory(
        cfg.run_path, "preconditioner --shard_preconditioners", "each rank writes its own part file there"
    )
    return True


def _save_sharded(cfg: PreconditionerConfig, pre: Preconditioner) -> None:
    """Every rank writes its blocks to its part file; rank 0 then writes the JSON naming the parts,
    with the hash of the whole (read back one block at a time) and each rank's memory."""
    root = Path(cfg.run_path)
    rank, ranks = distributed.rank(), distributed.world_size()

    def clear() -> None:
        root.mkdir(parents=True, exist_ok=True)
        for stale in [root / META_FILE, root / TENSORS_FILE, *root.glob(PART_GLOB)]:
            stale.unlink(missing_ok=True)
        save_yaml(cfg, root / CONFIG_FILE)

    distributed.on_rank_zero(clear, f"clearing {root}")
    pre.save_tensors(root / part_file(rank, ranks))
    dims = {m["name"]: m["dim"] for m in pre.layout["modules"]}
    owners = shard_owners(dims, ranks)
    memory = distributed.all_gather_objects((_statistics_bytes(dims, pre.modules), _peak_rss()))
    distributed.barrier("writing the preconditioner's part files")

    def meta() -> None:
        shards = {part_file(r, ranks): [n for n in dims if owners[n] == r] for r in range(ranks)}
        sharding = {
            "ranks": ranks,
            "statistics_bytes_per_rank": [m[0] for m in memory],
            "unsharded_statistics_bytes": _statistics_bytes(dims, list(dims)),
            "peak_rss_bytes_per_rank": [m[1] for m in memory],
        }
        pre.save_meta(root, sharded_identity(root, shards, pre), list(dims), shards, sharding=sharding)
        logger.info(
            "--shard_preconditioners: statistics per rank %s of %s unsharded",
            ", ".join(megabytes(b) for b in sharding["statistics_bytes_per_rank"]),
            megabytes(sharding["unsharded_statistics_bytes"]),
        )

    distributed.on_rank_zero(meta, f"saving the preconditioner at {root}")
