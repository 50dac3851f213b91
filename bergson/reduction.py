"""``bergson reduce``: one aggregated vector (mean or sum) for a dataset or an existing store."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import torch

from . import distributed
from .config import ReduceConfig, save_yaml
from .config.options import COMPUTING, unused_with
from .core.rows import unit_rows
from .errors import BergsonError
from .methods.build import build
from .models import honours_numerics
from .store import GradientStore, StoreWriter, load_gradients
from .transforms.normalizers import NORMALIZERS_FILE
from .transforms.preconditioners import STORE_DIR as PRECONDITIONER_DIR
from .transforms.preconditioners import carried, fixed_preconditioner, resolve_preconditioner


@honours_numerics
def reduce(cfg: ReduceConfig) -> GradientStore:
    """Aggregate a dataset's gradients (computed now, or read from ``cfg.index``) into one row."""
    if cfg.aggregation == "none":
        raise BergsonError("--aggregation none: reduce needs mean or sum")
    if cfg.per_token:
        raise BergsonError(
            "--per_token: reduce writes one aggregated vector, which has no tokens to break down"
        )
    if not cfg.index:
        return build(cfg)
    distributed.refuse(cfg, "bergson reduce --index (reducing a store, with no gradients to compute)")
    if not cfg.run_path:
        raise BergsonError("run_path is required: the output directory of the reduced store")
    source = load_gradients(cfg.index)
    unused = unused_with(cfg, "--index", COMPUTING, "the vectors of the store are reduced as they are")
    if source.manifest.kind != "gradients":
        raise BergsonError(
            f"--index {cfg.index}: expected a per-row gradient store, found a {source.manifest.kind} store"
        )
    pre = resolve_preconditioner(cfg.preconditioner_path, [("--index", source)])
    fixed = fixed_preconditioner([("--index", source)], cfg.unit_normalize)
    transform = None
    if pre is not None:
        extra = -0.5 - carried(source.manifest)
        transform = pre.transform(extra, source.manifest.modules) if extra else None
    manifest = replace(
        source.manifest,
        preconditioner=pre.info(-0.5) if pre is not None else fixed,
        kind="aggregate",
        status="in_progress",
        aggregation=cfg.aggregation,
        unit_normalize=cfg.unit_normalize,
        shards=[],
        plan={"source": str(source.root)},
        per_token=False,
        producer={**source.manifest.producer, "unused_options": unused},
    )
    writer = StoreWriter(cfg.run_path, manifest, overwrite=cfg.overwrite)
    if writer.complete:
        return load_gradients(cfg.run_path)
    save_yaml(cfg, writer.root / "config.yaml")
    if pre is not None:
        pre.save(writer.root / PRECONDITIONER_DIR)
    if (source.root / NORMALIZERS_FILE).is_file():
        shutil.copyfile(source.root / NORMALIZERS_FILE, writer.root / NORMALIZERS_FILE)
    writer.begin_shard(0, range(len(source)))
    for start, block in source.blocks():
        rows = source.rows[start : start + len(block)]
        vecs = torch.from_numpy(block.astype(np.float64))
        if transform is not None:
            vecs = transform(vecs)
        if cfg.unit_normalize:
            vecs = unit_rows(vecs)
        writer.write(np.arange(start, start + len(block)), vecs.numpy(), rows["num_tokens"], rows["loss"])
    writer.end_shard(0)
    writer.finalize(1)
    return load_gradients(cfg.run_path)
