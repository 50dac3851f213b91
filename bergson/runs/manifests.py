"""A run's manifest: what produced the vectors (model, modules and their column layout,
projection, normalizers, loss, data and its token fingerprint), and the normalizers a run uses."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch

from .. import __version__, distributed
from ..config import DataConfig, IndexConfig, to_dict
from ..config.commands import command_of
from ..config.original import differing_defaults
from ..core.layout import base_model_prefix, column_layouts
from ..data import TokenizedDocs
from ..errors import BergsonError
from ..models import head_splits, tracking_record
from ..store import Manifest
from ..transforms.normalizers import Normalizer, kind_of
from .documents import tokens_fingerprint


def loss_kind(data: DataConfig) -> str:
    """The manifest's name for the loss the data options select."""
    if data.conversation_column:
        return "chat"
    if data.reward_column:
        return "grpo"
    return "completion" if data.completion_column else "causal_lm"


def _normalizer_info(normalizers: Mapping[str, Normalizer] | None) -> dict[str, Any] | None:
    if not normalizers:
        return None
    h = hashlib.sha256()
    kinds = set()
    for name in sorted(normalizers):
        n = normalizers[name]
        kinds.add(kind_of(n))
        h.update(name.encode())
        for t in vars(n).values():
            if isinstance(t, torch.Tensor):
                h.update(t.detach().cpu().double().numpy().tobytes())
    return {"kind": "+".join(sorted(kinds)), "modules": len(normalizers), "sha256": h.hexdigest()}


def make_manifest(
    cfg: IndexConfig,
    model: torch.nn.Module,
    modules: Mapping[str, torch.nn.Module],
    docs: TokenizedDocs,
    max_tokens: int,
    normalizers: Mapping[str, Normalizer] | None = None,
) -> Manifest:
    # a command without an option group (ekfac has no store options, magic no heads) writes what
    # it does: unsplit modules, summed losses, one row per document, in the default dtype
    heads = head_splits(model, modules, getattr(cfg, "attention_heads", None))
    reduction = getattr(cfg, "loss_reduction", "sum")
    aggregation, save_dtype = getattr(cfg, "aggregation", "none"), getattr(cfg, "save_dtype", "auto")
    aggregate = getattr(cfg, "aggregate_experts", False)
    layouts = column_layouts(
        modules, cfg.projection_dim, cfg.include_bias, heads, base_model_prefix(model), aggregate
    )
    dtype = save_dtype if save_dtype != "auto" else ("float16" if cfg.projection_dim > 0 else "float32")
    config = getattr(model, "config", None)
    return Manifest(
        kind="aggregate" if aggregation != "none" else "gradients",
        status="in_progress",
        model={
            "name": cfg.model,
            "revision": cfg.revision,
            "commit": getattr(config, "_commit_hash", None),
            "class": distributed.model_class(model).__name__,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            **tracking_record(model, modules, modules_option=bool(getattr(cfg, "modules", None))),
        },
        modules=layouts,
        projection={
            "kind": "gaussian_two_sided" if cfg.projection_dim > 0 else "none",
            "dim": cfg.projection_dim,
            "seed": cfg.projection_seed,
            "include_bias": cfg.include_bias,
        },
        normalizer=_normalizer_info(normalizers),
        preconditioner=None,
        loss={
            "kind": loss_kind(cfg.data),
            "reduction": reduction,
            **({"pair_format": docs.info["pair_format"]} if "pair_format" in docs.info else {}),
        },
        dtype=dtype,
        num_rows=len(docs),
        data={
            **to_dict(cfg.data),
            "max_tokens": max_tokens,
            "num_documents": len(docs),
            "tokens_sha256": tokens_fingerprint(docs),
            **docs.info,
        },
        plan={
            "shard_size": getattr(cfg, "shard_size", None),
            "token_batch_size": cfg.token_batch_size,
            **(
                {"token_batch_size_auto": auto}
                if (auto := getattr(cfg, "_token_batch_size_auto", None))
                else {}
            ),
        },
        aggregation=aggregation,
        unit_normalize=getattr(cfg, "unit_normalize", False),
        per_token=getattr(cfg, "per_token", False),
        producer={
            "bergson": __version__,
            "world_size": distributed.world_size(),
            "defaults_differing_from_original": differing_defaults(cfg, command_of(cfg)),
        },
    )


def resolve_normalizers(
    cfg: Any,
    model: torch.nn.Module,
    modules: Mapping[str, torch.nn.Module],
    given: Mapping[str, Normalizer] | None = None,
) -> Mapping[str, Normalizer] | None:
    """Normalizers passed in Python, or read from ``--optimizer_state`` or ``--whitening`` (one of them)."""
    flag = "--optimizer_state" if cfg.optimizer_state else "--whitening" if cfg.whitening else ""
    if given is not None and flag:
        raise BergsonError(f"pass normalizers or {flag}, not both")
    if given is not None or not flag:
        return given
    if cfg.whitening:
        from ..transforms.whitening import whitening_from_ekfac

        return whitening_from_ekfac(cfg.whitening, modules, cfg.include_bias, cfg.whitening_damping)
    from ..transforms.optimizer_state import normalizers_from_optimizer_state

    return normalizers_from_optimizer_state(
        cfg.optimizer_state, model, modules, form=cfg.normalizer_form, include_bias=cfg.include_bias
    )
