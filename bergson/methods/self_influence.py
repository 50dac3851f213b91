"""``bergson self_influence``: every document's score against itself, with the method's preconditioner.

A document's self-influence is gᵀ M g: how much one step on the document lowers its own loss,
measured in the metric of the method's preconditioner M. Large values mark the documents the model
had to bend most to fit: outliers, mislabeled or memorised examples. Per method (g: the document's
gradient, summed over its loss tokens):

* ``dot``: |g|² (M = I). With ``--projection_dim p > 0`` it is |L G Rᵀ|², the squared norm of the
  projected gradient `bergson build` stores, an unbiased random-projection estimate of the full
  |g|² (E[|L G Rᵀ|²] = |G|²); ``--projection_dim 0`` gives |g|² exactly. With ``--optimizer_state``
  g is divided by the optimizer's moments first (the Adam-normalized norm).
* ``trackstar``: |(R + δI)^{-1/2} g̃|² with g̃ the optimizer-normalized, projected gradient and R the
  second moment of g̃ over the training set (``bergson trackstar``'s training-set preconditioner,
  fitted on ``--stats_documents``). TrackStar's unit normalization is not applied: it would make
  every self-score 1.
* ``ekfac``: gᵀ (F + δI)⁻¹ g with the EK-FAC Fisher of ``bergson ekfac`` (the same stages, fitted by
  :func:`~bergson.methods.ekfac.command.fit_curvature`), on full gradients.
* ``cosine`` is refused: a vector's cosine with itself is 1.

Stages under the run directory (each skipped when complete): ``covariances/``, ``eigen/``,
``corrected/`` (ekfac) or ``preconditioner/`` (trackstar), then ``scores/``: a scores store with
one column, one row per document (token rows with ``--per_token``: token t's share g_tᵀ M g,
summing to the document's score), its manifest recording the method and the preconditioner.
Every pass runs on the one pass engine: the collection loop with a squared-norm sink (dot,
trackstar), or EK-FAC's document source with a self-score statistic (ekfac).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import distributed
from ..config import SelfInfluenceConfig, to_dict
from ..config.options import is_default
from ..core.layout import ModuleLayout
from ..core.sinks import WriterSink
from ..errors import BergsonError
from ..models import announce_coverage, find_tracked_modules, honours_numerics, load_model
from ..store import GradientStore, Manifest, StoreWriter, load_gradients
from ..transforms.ekfac import Factors, ihvp, kfac_eigenvalues
from ..transforms.normalizers import Normalizer

logger = logging.getLogger(__name__)

METHODS = ("dot", "trackstar", "ekfac")
"""The methods whose self-influence is defined (``cosine`` is refused: it is identically 1)."""
STAGES = ("covariances", "eigen", "corrected", "preconditioner", "scores")
CONFIG_FILE = "self_influence.yaml"
ORIENTATION = (
    "larger = more self-influential: training on the document lowers its own loss more "
    "(gᵀ M g, M the method's preconditioner)"
)
PRECONDITIONERS = {
    "dot": "none (M = I): |g|²",
    "trackstar": "(R + δI)⁻¹, R the training set's second moment of the normalized, projected gradients",
    "ekfac": "(F + δI)⁻¹, F the EK-FAC Fisher",
}
# the options each method reads beyond the common ones (a method given another's is refused)
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "projection_dim": ("dot", "trackstar"),
    "projection_seed": ("dot", "trackstar"),
    "shard_size": ("dot", "trackstar"),
    "loss_reduction": ("dot", "trackstar"),
    "optimizer_state": ("dot", "trackstar"),
    "normalizer_form": ("dot", "trackstar"),
    "aggregate_experts": ("dot", "trackstar"),
    "attention_heads": ("dot", "trackstar"),
    "damping": ("trackstar", "ekfac"),
    "damping_mode": ("trackstar", "ekfac"),
    "stats_documents": ("trackstar",),
    "sample_seed": ("trackstar",),
    "fisher": ("ekfac",),
    "fisher_seed": ("ekfac",),
    "factor_dtype": ("ekfac",),
}


def check(cfg: SelfInfluenceConfig) -> None:
    """Refuse an unknown method, cosine, and options the chosen method does not read."""
    if cfg.method == "cosine":
        raise BergsonError(
            "--method cosine: a document's cosine with itself is 1 for every document, so it ranks "
            "nothing; use --method trackstar (TrackStar's preconditioned norm, before its unit "
            "normalization), dot or ekfac"
        )
    if cfg.method not in METHODS:
        raise BergsonError(f"--method {cfg.method!r}: choose one of {', '.join(METHODS)}")
    for name, methods in METHOD_OPTIONS.items():
        if cfg.method not in methods and not is_default(cfg, name):
            raise BergsonError(
                f"--{name} with --method {cfg.method}: only --method {' or '.join(methods)} reads it; "
                "drop the option or choose that method"
            )
    if cfg.method == "ekfac" and cfg.data.reward_column:
        raise BergsonError(
            "--reward_column with --method ekfac: EK-FAC uses the plain next-token loss; use --method "
            "dot or trackstar for advantage-weighted (GRPO) losses"
        )


class SelfScoreSink(WriterSink):
    """Writes each row's squared norm |v|² (of the vector as the collection loop hands it: projected,
    normalized and preconditioned by H^{-1/2}) as a one-column scores row; token rows get each token's
    share v_t · v, which sums to |v|² because the token vectors sum to v."""

    def __init__(self, writer: StoreWriter):
        self.writer = writer

    def write(self, row_ids, vectors, num_tokens, losses, tokens=None) -> None:  # types: Sink.write
        v = np.asarray(vectors, np.float64)
        scores = (v * v).sum(1, keepdims=True)
        shares = None
        if tokens is not None:
            shares = np.einsum("bsd,bd->bs", np.asarray(tokens, np.float64), v)[..., None]
        self.writer.write(
            row_ids,
            scores.astype(np.float32),
            num_tokens,
            losses,
            None if shares is None else shares.astype(np.float32),
        )


def ekfac_self_scores(
    source: Any,
    eigen: Factors,
    corrected: Factors | None,
    damping: float,
    damping_mode: str,
    dtype: torch.dtype = torch.float64,
    lengths: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray], list[np.ndarray] | None]:
    """gᵀ (F + δI)⁻¹ g for every example of one pass of ``source`` (an EK-FAC
    :class:`~bergson.methods.ekfac.passes.Source`, with the dataset's labels), summed over the modules
    of ``eigen``: per module ⟨(F + δI)⁻¹ G_n, G_n⟩ with the EK-FAC eigenvalues ``corrected`` (K-FAC's
    when None) and the damping of ``bergson ekfac``. Returns the totals [N], the modules' shares and,
    given the documents' ``lengths``, each token's share g_tᵀ P_n x_t ([length] per row)."""
    from .ekfac.passes import per_document_gradients

    local: dict[str, tuple[Factors, torch.Tensor]] = {}
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {name: [] for name in eigen.tensors}
    tokens = None if lengths is None else [np.zeros(int(n)) for n in lengths]

    def fn(name: str, x: torch.Tensor, g: torch.Tensor, rows: np.ndarray, mask: torch.Tensor | None) -> None:
        if name not in eigen.tensors:
            return
        if name not in local:  # this module's eigenbases and eigenvalues on the device, once
            lam = (
                corrected.tensors[name]["eigenvalues"]
                if corrected is not None
                else kfac_eigenvalues(eigen, name)
            )
            one = {name: {k: t.to(x.device, dtype) for k, t in eigen.tensors[name].items()}}
            local[name] = (Factors(one), lam.to(x.device, dtype))
        factors, lam = local[name]
        x, g = x.to(dtype), g.to(dtype)
        grads = per_document_gradients(x, g)  # [B, out, in]
        products = ihvp(factors, lam, name, grads, damping, damping_mode)
        parts[name].append((rows, (products * grads).sum((1, 2)).double().cpu().numpy()))
        if tokens is not None:
            shares = torch.einsum("bto,boi,bti->bt", g, products, x).double().cpu().numpy()
            for b, row in enumerate(rows):
                tokens[row] += shares[b, : len(tokens[row])]

    seen = source.run("self-influence", fn, "empirical")
    num = source.num_rows if source.num_rows is not None else seen
    per_module = {name: np.zeros(num) for name in eigen.tensors}
    for name, pieces in parts.items():
        for rows, values in pieces:
            per_module[name][rows] = values
    total = np.zeros(num)
    for values in per_module.values():
        total += values
    return total, per_module, tokens


def scores_manifest(base: Manifest, cfg: SelfInfluenceConfig, preconditioner: dict[str, Any]) -> Manifest:
    """The manifest of a self-influence scores store: the documents' provenance, one column."""
    return replace(
        base,
        kind="scores",
        status="in_progress",
        modules=[ModuleLayout("scores", "scores", [1], False, 0, 1)],
        dtype="float32",
        aggregation="none",
        unit_normalize=False,
        per_token=cfg.per_token,
        preconditioner=preconditioner,
        score={
            "kind": "self_influence",
            "method": cfg.method,
            "mode": "self",
            "columns": 1,
            "preconditioner": PRECONDITIONERS[cfg.method],
            "projection_dim": 0 if cfg.method == "ekfac" else cfg.projection_dim,
            "orientation": ORIENTATION,
            "unit_normalize": False,
        },
    )


def _vector_method(
    cfg: SelfInfluenceConfig, run: Any, model: Any, tokenizer: Any, docs: Any, max_tokens: int,
    modules: Mapping[str, torch.nn.Module], normalizers: Mapping[str, Normalizer] | None,
) -> GradientStore:  # fmt: skip
    """dot and trackstar: the collection loop into a squared-norm sink (trackstar: after (R + δI)^-1/2)."""
    from ..preconditioning import fit_on_documents
    from ..runs.documents import subsample
    from ..runs.manifests import make_manifest
    from ..runs.shared_store import collect_with
    from ..transforms.preconditioners import is_complete, load_preconditioner

    c: Any = cfg  # the collection options of an IndexConfig, under their own names
    base = make_manifest(c, model, modules, docs, max_tokens, normalizers)
    announce_coverage(base.model)
    transform, info = None, {"kind": "none", "method": cfg.method}
    if cfg.method == "trackstar":
        path = run.root / "preconditioner"
        if not is_complete(path):
            start = time.perf_counter()
            sample, _ = subsample(docs, cfg.stats_documents, cfg.sample_seed)
            source = {**to_dict(cfg.data), "documents": len(sample), "sample_seed": cfg.sample_seed}
            pre = fit_on_documents(
                c, model, modules, sample, max_tokens, tokenizer.pad_token_id, normalizers,
                damping=cfg.damping, damping_mode=cfg.damping_mode, source=source,
            )  # fmt: skip
            pre.save(path)
            run.record("preconditioner", start)
        pre = load_preconditioner(path)
        pre.check(base, f"the documents of {cfg.run_path}")
        transform = pre.transform(-0.5, base.modules)
        info = {
            "kind": "trackstar",
            "path": str(path),
            **pre.info(-1.0),
            "applied": "(R + δI)^-1/2 to each row",
        }
    writer = StoreWriter(run.root / "scores", scores_manifest(base, cfg, info), overwrite=cfg.overwrite)
    if not writer.complete:
        start = time.perf_counter()
        sink = SelfScoreSink(writer)
        collect_with(
            c, model, docs, modules, sink, normalizers, tokenizer.pad_token_id,
            transform=transform, per_token=cfg.per_token,
        )  # fmt: skip
        writer.finalize(-(-len(docs) // cfg.shard_size))
        run.record("scores", start)
    return load_gradients(run.root / "scores")


def _ekfac_method(
    cfg: SelfInfluenceConfig, run: Any, model: Any, tokenizer: Any, docs: Any, max_tokens: int,
    modules: Mapping[str, torch.nn.Module],
) -> GradientStore:  # fmt: skip
    """ekfac: ``bergson ekfac``'s curvature stages, then one pass scoring every document against itself."""
    from ..runs.manifests import make_manifest
    from .ekfac.command import fit_curvature, pass_options
    from .ekfac.passes import DocumentSource

    opts = pass_options(cfg, modules, tokenizer, True)
    eigen, corrected = fit_curvature(run, run.root, model, docs, opts, "ekfac")
    path = run.root / "scores"
    full: Any = replace(cfg, projection_dim=0)  # EK-FAC's vectors are the full gradients
    base = make_manifest(full, model, modules, docs, max_tokens)
    announce_coverage(base.model)
    info = {
        "kind": "ekfac",
        "fisher": cfg.fisher,
        "fisher_seed": cfg.fisher_seed,
        "damping": cfg.damping,
        "damping_mode": cfg.damping_mode,
        "run": str(run.root),
    }
    writer = StoreWriter(path, scores_manifest(base, cfg, info), overwrite=cfg.overwrite)
    if writer.complete:
        return load_gradients(path)
    start = time.perf_counter()
    dtype = torch.float64 if opts.dtype == torch.float64 else torch.float32
    lengths = docs.lengths if cfg.per_token else None
    total, _, tokens = ekfac_self_scores(
        DocumentSource(model, docs, opts), eigen, corrected, cfg.damping, cfg.damping_mode, dtype, lengths
    )
    n = len(total)
    writer.begin_shard(0, range(n))
    padded = None
    if tokens is not None:
        from ..store.scores import pad_token_rows

        padded = pad_token_rows([t[:, None] for t in tokens], 1)
    writer.write(
        np.arange(n), total[:, None].astype(np.float32), docs.lengths, np.zeros(n, np.float32), padded
    )
    writer.end_shard(0)
    writer.finalize(1)
    run.record("scores", start)
    return load_gradients(path)


@honours_numerics
def self_influence(
    cfg: SelfInfluenceConfig, normalizers: Mapping[str, Normalizer] | None = None
) -> GradientStore:
    """Run (or resume) ``bergson self_influence``; returns the scores store (one column, one row per
    document; larger = more self-influential). ``normalizers`` (dot, trackstar) are passed in Python
    instead of ``--optimizer_state``. Runs in one process."""
    from ..runs.documents import load_docs, token_budget, validate_index_config
    from ..runs.manifests import resolve_normalizers
    from ..runs.rundir import RunDir

    check(cfg)
    distributed.refuse(cfg, "bergson self_influence")
    if normalizers is not None and cfg.method == "ekfac":
        raise BergsonError("normalizers with --method ekfac: EK-FAC's Fisher is of the plain gradients")
    validate_index_config(cfg)
    run = RunDir(cfg, command="self_influence", what="a self-influence run", config_file=CONFIG_FILE,
                 outputs=STAGES).prepare()  # fmt: skip
    model, tokenizer = load_model(cfg)
    max_tokens = token_budget(cfg, model)
    modules = find_tracked_modules(
        model, cfg.modules, include_output_head=cfg.include_output_head, track_experts=cfg.tracked_experts()
    )
    docs = load_docs(cfg.data, tokenizer, max_tokens)
    if cfg.method == "ekfac":
        logger.info("self_influence --method ekfac: full gradients (no projection), the EK-FAC Fisher")
        return _ekfac_method(cfg, run, model, tokenizer, docs, max_tokens, modules)
    norms = resolve_normalizers(cfg, model, modules, normalizers)
    if cfg.method == "trackstar" and not norms:
        logger.warning(
            "self_influence --method trackstar without --optimizer_state: the gradients are not "
            "optimizer-normalized (g̃ = g), so R is the plain gradients' second moment"
        )
    return _vector_method(cfg, run, model, tokenizer, docs, max_tokens, modules, norms)


def store_path(cfg: SelfInfluenceConfig) -> Path:
    """Where the scores store of a run lies."""
    return Path(cfg.run_path) / "scores"
