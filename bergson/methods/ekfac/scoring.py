"""EK-FAC's queries and scores: inverse-Fisher-vector products of the query gradients, one
scoring pass over the training data, and the preconditioned queries as a store."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ... import distributed
from ...data import TokenizedDocs
from ...errors import BergsonError
from ...transforms.ekfac import Factors, flat_inner, ihvp, kfac_eigenvalues
from .passes import (
    DocumentSource,
    EkfacOptions,
    Source,
    per_document_gradients,
    rank_documents,
    sum_over_ranks,
)


def precondition_queries(
    grads: Mapping[str, torch.Tensor],
    eigen: Factors,
    corrected: Factors | None,
    damping: float,
    damping_mode: str,
    rank: int = 0,
    dtype: torch.dtype = torch.float64,
    solved: tuple[Mapping[str, torch.Tensor], dict[str, Any]] | None = None,
) -> Factors:
    """(F + δI)⁻¹ G_q per module (EK-FAC eigenvalues, or K-FAC's when ``corrected`` is None).

    ``solved``: products already computed by another iHVP (:func:`.ihvp.solve`: ASTRA or LiSSA)
    and what to record of it in the metadata; they replace EK-FAC's own.

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
        p = (
            solved[0][name].to(dtype)
            if solved
            else ihvp(eigen, lam, name, g.to(dtype), damping, damping_mode)
        )
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
        **(solved[1] if solved else {"ihvp": "ekfac"}),
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


def score_modules(
    source: Source, queries: Factors, dtype: torch.dtype, tokens: list[np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """⟨P_q, G_n⟩ [N, nq] per module for every example n of one pass (with the dataset's labels)
    against the preconditioned queries P_q; with ``tokens`` (one [length, nq] array per row),
    each token's share g_tᵀ P_q x_t is added to its row's array."""
    nq = int(queries.meta["queries"])
    cache: dict[str, dict[str, torch.Tensor]] = {}
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {name: [] for name in queries.tensors}

    def fn(name: str, x: torch.Tensor, g: torch.Tensor, rows: np.ndarray, mask: torch.Tensor | None) -> None:
        if name not in cache:
            cache[name] = {k: t.to(x.device, dtype) for k, t in queries.tensors[name].items()}
        q = cache[name]
        x, g = x.to(dtype), g.to(dtype)
        contrib = None
        if "ihvp" in q:  # [nq, out, in]
            doc = flat_inner(per_document_gradients(x, g), q["ihvp"])
            if tokens is not None:
                contrib = torch.einsum("bto,qoi,bti->btq", g, q["ihvp"], x)
        else:  # rank r: (g_t · left_k)(right_k · x_t), summed over k (and t)
            contrib = (
                torch.einsum("bto,qok->btqk", g, q["left"]) * torch.einsum("bti,qki->btqk", x, q["right"])
            ).sum(-1)
            doc = contrib.sum(1)
        parts[name].append((rows, doc.double().cpu().numpy()))
        if tokens is not None and contrib is not None:
            c = contrib.double().cpu().numpy()
            for b, row in enumerate(rows):
                tokens[row] += c[b, : len(tokens[row])]

    seen = source.run("scores", fn, "empirical")
    num = source.num_rows if source.num_rows is not None else seen
    per_module = {name: np.zeros((num, nq)) for name in queries.tensors}
    for name, pieces in parts.items():
        for rows, values in pieces:
            per_module[name][rows] = values
    return per_module


def score_documents(
    model: nn.Module, docs: TokenizedDocs, queries: Factors, opts: EkfacOptions, per_token: bool = False
) -> Scores:
    """Σ_modules ⟨(F + δI)⁻¹ G_q, G_n⟩ for every training document n, in one pass (on several
    ranks: each scores its documents, then one all-reduce gives every rank all the rows)."""
    dtype = torch.float64 if opts.dtype == torch.float64 else torch.float32
    nq = int(queries.meta["queries"])
    tokens = [np.zeros((n, nq)) for n in docs.lengths] if per_token else None
    source = DocumentSource(model, docs, opts, rank_documents(docs))
    per_module = score_modules(source, queries, dtype, tokens)
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


def save_query_store(
    path: Path, queries: Factors, base_manifest: Any, info: dict[str, Any], seed: int, p: int
) -> Any:
    """The preconditioned queries projected like ``bergson build --projection_dim p`` (no
    normalizer): per module L P_q Rᵀ with the build's own matrices, so that ⟨L P Rᵀ, L G Rᵀ⟩
    ≈ ⟨P, G⟩ and `bergson score --query_path` against a projected store approximates the
    EK-FAC scores (p = 0: the full products, in the layout of a full-gradient store, and the
    scores are exact). The manifest marks the vectors as carrying (F + δI)⁻¹ (kind "ekfac")."""
    from ...store import StoreWriter, load_gradients
    from ...transforms.projection import projection_matrix

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
