"""EK-FAC influence functions: the collection loop with statistics consumers, stage by stage.

Stages (each saved as safetensors + JSON under the run directory and skipped when complete):

    covariances/   A and S per module (true Fisher: labels sampled from the model, seeded per document)
    eigen/         their float64 eigendecompositions
    corrected/     EK-FAC eigenvalues: mean squared per-document gradient in the Kronecker eigenbasis
    queries/       inverse-Fisher-vector products of the query gradients, (F + δI)⁻¹ G_q
                   (or their best rank-r approximations, with --query_rank r)
    query_store/   with --projected_queries: those products projected like `bergson build`,
                   an ordinary store that `bergson score --query_path` scores against
    scores/        a scores store, one column per query: Σ_modules ⟨(F + δI)⁻¹ G_q, G_n⟩

``timings.json`` records the seconds each stage took in the run that computed it.

Several workers (``--nproc_per_node N`` or torchrun) split the training documents, whole,
balancing their token counts (:func:`rank_documents`; the same split on every rank). Each
pass over the training data sums over the rank's own documents, then one all-reduce adds
the ranks' sums (covariances, eigenvalue corrections, score rows and token rows, which are
zero outside a rank's documents), so every rank holds the totals and divides by the same
global counts. Rank 0 alone writes the stages (and alone computes the eigendecompositions,
the query products and the query store) while the others wait, then every rank loads what
it wrote, so all ranks use identical eigenbases and queries. Whether a stage is already
complete is decided by rank 0 and broadcast, so a resumed run skips the same stages on
every rank. The true-Fisher labels are seeded per document, so the results do not depend
on the number of workers (up to float rounding of the sums).

Scores are oriented like every bergson score: positive means training on the document
lowers the query's loss.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..collect.hooks import LayerTap
from ..collect.loop import idle_step
from ..core.layout import module_shape
from ..data import TokenizedDocs
from ..data.batching import IGNORE, assign_shards, pad_batch, plan_batches
from ..errors import BergsonError
from ..models import honours_numerics
from ..transforms.ekfac import (
    Factors,
    add_corrections,
    add_covariances,
    eigendecompose,
    ihvp,
    kfac_eigenvalues,
)

logger = logging.getLogger(__name__)


def document_seed(seed: int, row: int) -> int:
    """The label-sampling seed of one document: independent of batching and worker count."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{row}".encode()).digest()[:8], "little") >> 1


def targets(
    logits: torch.Tensor, labels: torch.Tensor, rows: np.ndarray, fisher: str, seed: int
) -> torch.Tensor:
    """Next-token targets aligned with ``logits`` ([B, T]; -100 where there is no loss).

    ``fisher='empirical'`` uses the dataset's tokens; ``'true'`` samples each target from
    the model's own prediction with a generator seeded per document (:func:`document_seed`).
    """
    target = torch.full_like(labels, IGNORE)
    target[:, :-1] = labels[:, 1:]
    if fisher == "empirical":
        return target
    if fisher != "true":
        raise BergsonError(f"--fisher {fisher!r}: choose true or empirical")
    with torch.no_grad():
        for b, row in enumerate(rows):
            pos = (target[b] != IGNORE).nonzero().squeeze(1)
            if len(pos) == 0:
                continue
            probs = torch.softmax(logits[b, pos].float(), -1).cpu()
            gen = torch.Generator().manual_seed(document_seed(seed, int(row)))
            target[b, pos] = torch.multinomial(probs, 1, generator=gen).squeeze(1).to(target.device)
    return target


def rank_documents(docs: TokenizedDocs) -> np.ndarray | None:
    """The documents (indices into ``docs``) this rank processes: None (all) in one process.

    Whole documents, split among the ranks with balanced token counts (documents without a
    loss token count nothing); deterministic, so every rank computes the same split.
    """
    world = distributed.world_size()
    if world == 1:
        return None
    active = np.where(docs.num_loss_tokens() > 0, docs.lengths, 0)
    share = assign_shards(active.tolist(), world)[distributed.rank()]
    return np.asarray(share, dtype=np.int64)


def sum_over_ranks(tensors: list[torch.Tensor]) -> None:
    """Add each tensor's values over the ranks, in place, with one all-reduce (no-op in one
    process). The tensors share a dtype and a device, and every rank passes the same shapes
    in the same order."""
    if distributed.world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    distributed.all_reduce_sum(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def _input_dim(module: nn.Module, include_bias: bool) -> int:
    """The width of x at a tracked layer (plus the column of ones of a bias)."""
    return module_shape(module)[1] + int(include_bias and getattr(module, "bias", None) is not None)


def _batches(
    model: nn.Module,
    docs: TokenizedDocs,
    token_batch_size: int,
    pad_id: int,
    desc: str,
    progress: bool,
    only: np.ndarray | None = None,
) -> Iterator[tuple[np.ndarray, torch.Tensor | None, torch.Tensor | None]]:
    """(dataset rows, input ids, labels) of length-sorted batches of documents with a loss token
    (of the documents ``only``, when given; rows are always indices into ``docs``). A rank of a
    sharded model then gets ``(no rows, None, None)`` until every rank has had as many steps."""
    device = next(model.parameters()).device
    lengths = np.where(docs.num_loss_tokens() > 0, docs.lengths, 0)
    if only is not None:
        keep = np.zeros(len(lengths), dtype=bool)
        keep[only] = True
        lengths = np.where(keep, lengths, 0)
    batches = plan_batches(lengths, token_batch_size)
    with tqdm(total=int(lengths.sum()), unit="tok", unit_scale=True, desc=desc, disable=not progress) as bar:
        for idx in batches:
            ids, labels = pad_batch(docs, idx, pad_id)
            yield idx, ids.to(device), labels.to(device)
            bar.update(int(lengths[idx].sum()))
    for _ in range(distributed.lockstep(model, len(batches)) - len(batches)):
        yield np.empty(0, np.int64), None, None  # an idle step of a sharded model


@dataclass
class EkfacOptions:
    """What every EK-FAC pass needs besides the model and the documents."""

    modules: Mapping[str, nn.Module]
    token_batch_size: int = 2048
    pad_token_id: int = 0
    include_bias: bool = False
    fisher: str = "true"
    seed: int = 0
    progress: bool = True
    dtype: torch.dtype = torch.float32
    extra: dict[str, Any] = field(default_factory=dict)


def _run(
    model: nn.Module,
    docs: TokenizedDocs,
    opts: EkfacOptions,
    desc: str,
    fn: Any,
    fisher: str,
    only: np.ndarray | None = None,
) -> None:
    """One pass (over the documents ``only``, or all): forward, the loss under ``fisher``
    targets, backward with ``fn`` tapping each layer."""
    saved = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    state: dict[str, Any] = {}

    def tap(name: str, x: torch.Tensor, g: torch.Tensor) -> None:
        if not state["idle"]:
            fn(name, x, g, state)

    try:
        with LayerTap(opts.modules, tap, opts.include_bias):
            for rows, ids, labels in _batches(
                model, docs, opts.token_batch_size, opts.pad_token_id, desc, opts.progress, only
            ):
                state["idle"] = ids is None or labels is None
                if ids is None or labels is None:
                    idle_step(model, opts.pad_token_id)
                    continue
                lengths = torch.as_tensor(docs.lengths[rows], device=ids.device)
                state["rows"] = rows
                state["mask"] = torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]
                logits = model(input_ids=ids, use_cache=False).logits
                target = targets(logits, labels, rows, fisher, opts.seed)
                loss = F.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]),
                    target.reshape(-1),
                    ignore_index=IGNORE,
                    reduction="sum",
                )
                loss.backward()
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)


def fit_covariances(model: nn.Module, docs: TokenizedDocs, opts: EkfacOptions) -> Factors:
    """A = (1/T) Σ x xᵀ over real tokens, S = (1/N) Σ g gᵀ over documents with a loss token
    (on several ranks: each sums over its documents, then one all-reduce)."""
    sums: dict[str, dict[str, torch.Tensor]] = {}

    def fn(name: str, x: torch.Tensor, g: torch.Tensor, state: dict[str, Any]) -> None:
        m = state["mask"]
        add_covariances(sums, name, x[m].to(opts.dtype), g[m].to(opts.dtype))

    _run(model, docs, opts, "covariances", fn, opts.fisher, rank_documents(docs))
    if distributed.world_size() > 1:
        device = next(model.parameters()).device
        for name, module in opts.modules.items():  # a rank without documents has no sums yet
            if name not in sums:
                a, s = _input_dim(module, opts.include_bias), module_shape(module)[0]
                sums[name] = {
                    "A": torch.zeros(a, a, dtype=opts.dtype, device=device),
                    "S": torch.zeros(s, s, dtype=opts.dtype, device=device),
                }
        sum_over_ranks([sums[name][key] for name in opts.modules for key in ("A", "S")])
    active = docs.num_loss_tokens() > 0
    tokens, n = int(docs.lengths[active].sum()), int(active.sum())
    if n == 0:
        raise BergsonError("no document has a loss token: the Fisher is undefined")
    factors = {name: {"A": d["A"] / tokens, "S": d["S"] / n} for name, d in sums.items()}
    return Factors(
        factors,
        {"stage": "covariances", "tokens": tokens, "documents": n, "fisher": opts.fisher, "seed": opts.seed},
    )


def per_document_gradients(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """G_n = Σ_t g_t x_tᵀ for a batch: [B, out, in] (padding has g = 0, so it adds nothing)."""
    return g.mT.to(x.dtype) @ x


def fit_corrected_eigenvalues(
    model: nn.Module, docs: TokenizedDocs, eigen: Factors, opts: EkfacOptions
) -> Factors:
    """Λ[i, j] = (1/N) Σ_n (Q_Sᵀ G_n Q_A)[i, j]² with the same sampled labels as the covariances
    (on several ranks: each sums over its documents, then one all-reduce)."""
    sums: dict[str, torch.Tensor] = {}
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    dtype = torch.float64 if opts.dtype == torch.float64 else torch.float32

    def fn(name: str, x: torch.Tensor, g: torch.Tensor, state: dict[str, Any]) -> None:
        if name not in bases:  # converted once, not per batch (Q_S of an output head is large)
            d = eigen.tensors[name]
            bases[name] = (d["S_eigenvectors"].to(x.device, dtype), d["A_eigenvectors"].to(x.device, dtype))
        add_corrections(sums, name, bases[name], per_document_gradients(x.to(dtype), g))

    _run(model, docs, opts, "eigenvalue correction", fn, opts.fisher, rank_documents(docs))
    if distributed.world_size() > 1:
        device = next(model.parameters()).device
        for name, module in opts.modules.items():
            if name not in sums:
                shape = (module_shape(module)[0], _input_dim(module, opts.include_bias))
                sums[name] = torch.zeros(shape, dtype=dtype, device=device)
        sum_over_ranks([sums[name] for name in opts.modules])
    n = int((docs.num_loss_tokens() > 0).sum())
    return Factors(
        {name: {"eigenvalues": s.double() / n} for name, s in sums.items()},
        {"stage": "corrected", "documents": n},
    )


def query_gradients(model: nn.Module, docs: TokenizedDocs, opts: EkfacOptions) -> dict[str, torch.Tensor]:
    """Per-query gradients G_q [nq, out, in] of the queries' own (dataset-label) losses."""
    out: dict[str, torch.Tensor] = {}

    def fn(name: str, x: torch.Tensor, g: torch.Tensor, state: dict[str, Any]) -> None:
        grads = per_document_gradients(x.double(), g.double())
        if name not in out:
            out[name] = torch.zeros(len(docs), *grads.shape[1:], dtype=torch.float64)
        out[name][torch.as_tensor(state["rows"])] = grads.cpu()

    _run(model, docs, opts, "query gradients", fn, "empirical")
    return out


def precondition_queries(
    grads: Mapping[str, torch.Tensor],
    eigen: Factors,
    corrected: Factors | None,
    damping: float,
    damping_mode: str,
    rank: int = 0,
    dtype: torch.dtype = torch.float64,
) -> Factors:
    """(F + δI)⁻¹ G_q per module (EK-FAC eigenvalues, or K-FAC's when ``corrected`` is None).

    With ``rank`` r > 0 each product P_q (out × in) is replaced by its best rank-r
    approximation U_r diag(s_r) V_rᵀ (truncated SVD), saved as ``left`` = U_r diag(s_r)
    [nq, out, r] and ``right`` = V_rᵀ [nq, r, in]. Scoring then never forms a training
    document's gradient: ⟨P_q, Σ_t g_t x_tᵀ⟩ = Σ_t Σ_k (g_tᵀ left_k)(right_k x_t), which is
    cheaper whenever r (out + in) < out · in, so that many queries share one pass. The
    relative Frobenius error of the approximation is recorded per module in the metadata.
    ``dtype`` is the precision of the rotations (float32 is several times faster for the
    large eigenbasis of an output layer).
    """
    if rank < 0:
        raise BergsonError(f"--query_rank {rank}: must be >= 0 (0 keeps the full products)")
    out: dict[str, dict[str, torch.Tensor]] = {}
    errors: dict[str, float] = {}
    for name, g in grads.items():
        lam = (
            corrected.tensors[name]["eigenvalues"] if corrected is not None else kfac_eigenvalues(eigen, name)
        )
        p = ihvp(eigen, lam, name, g.to(dtype), damping, damping_mode)
        if rank == 0:
            out[name] = {"ihvp": p}
            continue
        u, s, vh = torch.linalg.svd(p, full_matrices=False)
        k = min(rank, s.shape[-1])
        kept = (s[:, :k] ** 2).sum()
        errors[name] = float(
            ((s**2).sum() - kept).clamp(min=0).sqrt() / (s**2).sum().sqrt().clamp(min=1e-300)
        )
        out[name] = {"left": u[:, :, :k] * s[:, None, :k], "right": vh[:, :k, :]}
    meta: dict[str, Any] = {
        "stage": "queries",
        "queries": len(next(iter(grads.values()))),
        "damping": damping,
        "damping_mode": damping_mode,
        "rank": rank,
    }
    if rank:
        meta["relative_error"] = errors
    return Factors(out, meta)


def query_products(queries: Factors, name: str) -> torch.Tensor:
    """The (possibly low-rank) preconditioned query gradients of one module as [nq, out, in]."""
    d = queries.tensors[name]
    return d["ihvp"] if "ihvp" in d else d["left"] @ d["right"]


@dataclass
class Scores:
    """Scores [N, nq] (documents without a loss token score 0), per module and, on request, per token."""

    total: np.ndarray
    per_module: dict[str, np.ndarray]
    per_token: list[np.ndarray] | None = None
    """For each document, [length, nq]: token t's share g_tᵀ P x_t; the rows sum to ``total``."""


def score_documents(
    model: nn.Module, docs: TokenizedDocs, queries: Factors, opts: EkfacOptions, per_token: bool = False
) -> Scores:
    """Σ_modules ⟨(F + δI)⁻¹ G_q, G_n⟩ for every training document n, in one pass (on several
    ranks: each scores its documents, then one all-reduce gives every rank all the rows)."""
    dtype = torch.float64 if opts.dtype == torch.float64 else torch.float32
    nq = int(queries.meta["queries"])
    per_module = {name: np.zeros((len(docs), nq)) for name in queries.tensors}
    tokens = [np.zeros((n, nq)) for n in docs.lengths] if per_token else None
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def fn(name: str, x: torch.Tensor, g: torch.Tensor, state: dict[str, Any]) -> None:
        if name not in cache:
            cache[name] = {k: t.to(x.device, dtype) for k, t in queries.tensors[name].items()}
        q = cache[name]
        x, g = x.to(dtype), g.to(dtype)
        rows = state["rows"]
        contrib = None
        if "ihvp" in q:  # [nq, out, in]
            doc = torch.einsum("boi,qoi->bq", per_document_gradients(x, g), q["ihvp"])
            if tokens is not None:
                contrib = torch.einsum("bto,qoi,bti->btq", g, q["ihvp"], x)
        else:  # rank r: (g_t · left_k)(right_k · x_t), summed over k (and t)
            contrib = (
                torch.einsum("bto,qok->btqk", g, q["left"]) * torch.einsum("bti,qki->btqk", x, q["right"])
            ).sum(-1)
            doc = contrib.sum(1)
        per_module[name][rows] = doc.double().cpu().numpy()
        if tokens is not None and contrib is not None:
            c = contrib.double().cpu().numpy()
            for b, row in enumerate(rows):
                tokens[row] += c[b, : len(tokens[row])]

    _run(model, docs, opts, "scores", fn, "empirical", rank_documents(docs))
    if distributed.world_size() > 1:
        # rows (and token rows) outside a rank's documents are zero, so the sum assembles them
        parts = [per_module[name] for name in queries.tensors]
        if tokens is not None:
            parts.extend(tokens)
        flat = torch.from_numpy(np.concatenate([a.reshape(-1) for a in parts]))
        sum_over_ranks([flat])
        offset = 0
        for a in parts:
            a.reshape(-1)[:] = flat[offset : offset + a.size].numpy()
            offset += a.size
    total = sum(per_module.values())
    assert isinstance(total, np.ndarray)
    return Scores(total, per_module, tokens)


STAGES = ("covariances", "eigen", "corrected", "queries", "query_store", "scores")


def save_query_store(
    path: Path, queries: Factors, base_manifest: Any, info: dict[str, Any], seed: int, p: int
) -> Any:
    """The preconditioned queries projected like ``bergson build --projection_dim p`` (no
    normalizer): per module L P_q Rᵀ with the build's own matrices, so that ⟨L P Rᵀ, L G Rᵀ⟩
    ≈ ⟨P, G⟩ and `bergson score --query_path` against a projected store approximates the
    EK-FAC scores (p = 0: the full products, in the layout of a full-gradient store, and the
    scores are exact). The manifest marks the vectors as carrying (F + δI)⁻¹ (kind "ekfac")."""
    from dataclasses import replace

    from ..store import StoreWriter, load_gradients
    from ..transforms.projection import projection_matrix

    blocks = []
    for layout in base_manifest.modules:
        prod = query_products(queries, layout.name).double()  # [nq, out, in(+1)]
        if p > 0:
            left = projection_matrix(seed, layout.name, "left", p, prod.shape[1], dtype=torch.float64)
            right = projection_matrix(seed, layout.name, "right", p, prod.shape[2], dtype=torch.float64)
            blocks.append((left @ prod @ right.T).reshape(len(prod), -1))
            continue
        # p = 0: the full-gradient layout of `bergson build` (weight in the parameter's own
        # orientation, flattened, then the bias column)
        n_in = layout.shape[1]
        weight = prod[:, :, :n_in].mT if layout.type == "Conv1D" else prod[:, :, :n_in]
        blocks.append(weight.reshape(len(prod), -1))
        if layout.bias:
            blocks.append(prod[:, :, n_in])
    vectors = torch.cat(blocks, 1).numpy().astype(np.float32)
    manifest = replace(
        base_manifest, status="in_progress", dtype="float32", preconditioner={**info, "power": -1.0}
    )
    writer = StoreWriter(path, manifest, overwrite=True)
    n = len(vectors)
    writer.begin_shard(0, range(n))
    writer.write(np.arange(n), vectors, np.zeros(n, np.int64), np.zeros(n, np.float32))
    writer.end_shard(0)
    writer.finalize(1)
    return load_gradients(path)


def _still_to_do(done: Any) -> bool:
    """Whether a stage is still to do, as rank 0 sees it (``done()`` runs there alone and every
    rank gets its answer, so that all ranks skip or run the same stages)."""
    return bool(distributed.broadcast(not done() if distributed.rank() == 0 else None))


def _is_store(path: Path) -> bool:
    from ..store import load_gradients

    try:
        load_gradients(path)
    except BergsonError:
        return False
    return True


def _scores_of(cfg: Any) -> Any:
    from ..store import load_gradients

    return load_gradients(Path(cfg.run_path) / "scores")


@distributed.entry(_scores_of)
@honours_numerics
def ekfac(cfg: Any) -> Any:
    """Run (or resume) ``bergson ekfac``; returns the scores store (rows x queries). On
    ``cfg.nproc_per_node`` workers (or the ranks of a torchrun launch) the passes over the
    training documents are split among the ranks and rank 0 writes the stages."""
    from dataclasses import replace

    from ..models import find_tracked_modules, load_model
    from ..runs.documents import load_docs, token_budget, validate_index_config
    from ..runs.manifests import make_manifest
    from ..runs.rundir import RunDir
    from ..store import load_gradients
    from ..store.scores import save_score_matrix

    validate_index_config(cfg)
    if not cfg.query.dataset:
        raise BergsonError("--query.dataset is required: the queries whose influences are wanted")
    if cfg.data.reward_column or cfg.query.reward_column:
        raise BergsonError(
            "--reward_column: EK-FAC scores use the plain next-token loss; advantage-weighted (GRPO) "
            "losses are available in build, score and query, not in bergson ekfac"
        )
    run = RunDir(
        cfg,
        command="ekfac",
        what="an EK-FAC run",
        config_file="ekfac.yaml",
        outputs=(*STAGES, "per_module.npz"),
        shared="every rank loads the stages rank 0 writes there: the eigenbases, the corrected eigenvalues "
        "and the preconditioned queries",
    ).prepare()
    root, lead = run.root, run.lead

    model, tokenizer = load_model(cfg)
    max_tokens = token_budget(cfg, model)
    modules = find_tracked_modules(model, cfg.modules)
    for name, module in modules.items():
        big = max(module_shape(module))
        if big > 4096 and lead:
            logger.warning(
                "%s: a %d x %d covariance factor; its eigendecomposition takes minutes and %.1f GB. "
                "Leave the layer out with --modules if it is not needed",
                name,
                big,
                big,
                big * big * 8 * 3 / 1e9,
            )
    opts = EkfacOptions(
        modules,
        token_batch_size=cfg.token_batch_size,
        pad_token_id=tokenizer.pad_token_id or 0,
        include_bias=cfg.include_bias,
        fisher=cfg.fisher,
        seed=cfg.fisher_seed,
        progress=lead,
        dtype=torch.float64 if cfg.factor_dtype == "float64" else torch.float32,
    )
    info = {
        "kind": "ekfac",
        "method": cfg.method,
        "fisher": cfg.fisher,
        "damping": cfg.damping,
        "damping_mode": cfg.damping_mode,
        "query_rank": cfg.query_rank,
        "run": str(root),
    }
    docs = load_docs(cfg.data, tokenizer, max_tokens)
    share = rank_documents(docs)
    if share is not None:
        active = np.where(docs.num_loss_tokens() > 0, docs.lengths, 0)
        logger.info(
            "rank %d of %d: %d of %d documents, %s of %s tokens",
            distributed.rank(),
            distributed.world_size(),
            len(share),
            len(docs),
            f"{int(active[share].sum()):,}",
            f"{int(active.sum()):,}",
        )
    if _still_to_do(lambda: Factors.complete(root / "covariances")):
        start = time.perf_counter()
        covariances = fit_covariances(model, docs, opts)  # summed over the ranks
        distributed.on_rank_zero(lambda: covariances.save(root / "covariances"), "saving the covariances")
        del covariances
        run.record("covariances", start)
    if _still_to_do(lambda: Factors.complete(root / "eigen")):
        start = time.perf_counter()
        distributed.on_rank_zero(
            lambda: eigendecompose(Factors.load(root / "covariances")).save(root / "eigen"),
            "eigendecomposing the covariances",
        )
        run.record("eigen", start)
    eigen = Factors.load(root / "eigen")  # rank 0's, on every rank
    corrected = None
    if cfg.method == "ekfac":
        if _still_to_do(lambda: Factors.complete(root / "corrected")):
            start = time.perf_counter()
            fitted = fit_corrected_eigenvalues(model, docs, eigen, opts)  # summed over the ranks
            distributed.on_rank_zero(
                lambda: fitted.save(root / "corrected"), "saving the corrected eigenvalues"
            )
            del fitted
            run.record("corrected", start)
        corrected = Factors.load(root / "corrected")
    qdocs = load_docs(cfg.query, tokenizer, max_tokens, option="--query.dataset")
    if _still_to_do(lambda: Factors.complete(root / "queries")):
        start = time.perf_counter()

        # every rank takes part in a sharded model's forward and backward passes
        shared = query_gradients(model, qdocs, opts) if distributed.is_sharded(model) else None

        def fit_queries(eigen: Factors, corrected: Factors | None) -> None:
            grads = shared if shared is not None else query_gradients(model, qdocs, opts)
            precondition_queries(
                grads, eigen, corrected, cfg.damping, cfg.damping_mode, cfg.query_rank, opts.dtype
            ).save(root / "queries")

        distributed.on_rank_zero(partial(fit_queries, eigen, corrected), "preconditioning the queries")
        run.record("queries", start)
    del eigen, corrected
    queries = Factors.load(root / "queries")
    if cfg.projected_queries and _still_to_do(lambda: _is_store(root / "query_store")):
        start = time.perf_counter()

        def write_query_store() -> None:
            qbase = make_manifest(
                replace(cfg, data=cfg.query, per_token=False), model, modules, qdocs, max_tokens
            )
            save_query_store(
                root / "query_store", queries, qbase, info, cfg.projection_seed, cfg.projection_dim
            )

        distributed.on_rank_zero(write_query_store, "writing the query store")
        run.record("query_store", start)
    scores_path = root / "scores"
    if not _still_to_do(lambda: _is_store(scores_path)):
        return load_gradients(scores_path)
    start = time.perf_counter()
    result = score_documents(model, docs, queries, opts, per_token=cfg.per_token)  # every row, every rank

    def write_scores() -> Any:
        if cfg.per_module_scores:
            arrays: dict[str, Any] = dict(result.per_module)
            np.savez(str(root / "per_module.npz"), **arrays)
        base = make_manifest(replace(cfg, projection_dim=0), model, modules, docs, max_tokens)
        score_info = {
            **info,
            "mode": "individual",
            "query_dataset": cfg.query.dataset,
            "unit_normalize": False,
        }
        store = save_score_matrix(
            scores_path, result.total, base, score_info, overwrite=True, tokens=result.per_token
        )
        run.record("scores", start)
        return store

    store = distributed.on_rank_zero(write_scores, f"writing the scores at {scores_path}")
    return store if store is not None else load_gradients(scores_path)
