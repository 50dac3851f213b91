"""EK-FAC's passes over the data: covariances, corrected eigenvalues and per-example gradients.

Every pass runs on the pass engine (:class:`~bergson.collect.engine.PassEngine`) with a
:class:`~bergson.collect.hooks.LayerTap`, which hands each tracked layer's inputs x [B, T, in]
and output gradients g [B, T, out] to a statistic. Two sources of data feed the same
statistics, so EK-FAC has one implementation and two entry points:

* :class:`DocumentSource`: tokenized documents in length-sorted token-budget batches, the
  loss under a Fisher's labels (:func:`~bergson.collect.losses.fisher_loss`), one rank's share
  of the documents, and lockstep steps for a sharded model (``bergson ekfac``);
* :class:`BatchSource`: any model with its own batches and per-example ``loss_fn`` (the
  custom-model API, :func:`bergson.methods.custom.fit_ekfac`); the loss defines the Fisher.

A statistic is ``fn(name, x, g, rows, mask)``: ``rows`` [B] are the examples' indices and
``mask`` [B, T] marks the real tokens of documents (None: every position is real).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ... import distributed
from ...collect.engine import LossFn, PassEngine
from ...collect.hooks import LayerTap
from ...collect.losses import document_batches, fisher_loss, idle_loss
from ...core.layout import module_shape
from ...data import TokenizedDocs
from ...data.batching import assign_shards, plan_batches
from ...errors import BergsonError
from ...transforms.ekfac import Factors, add_corrections, add_covariances, finish_covariances

Statistic = Callable[[str, torch.Tensor, torch.Tensor, np.ndarray, "torch.Tensor | None"], None]
"""``fn(name, x [B, T, in], g [B, T, out], rows [B], mask [B, T] or None)``."""


@dataclass
class EkfacOptions:
    """What every EK-FAC pass over documents needs besides the model and the documents."""

    modules: Mapping[str, nn.Module]
    token_batch_size: int = 2048
    pad_token_id: int = 0
    include_bias: bool = False
    fisher: str = "true"
    seed: int = 0
    progress: bool = True
    dtype: torch.dtype = torch.float32
    scales: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    """Per module (on g [out], on x [in, plus the bias column with ``include_bias``]): every pass over
    documents multiplies the layer's output gradients and inputs by them (in ``dtype``), so the
    statistics are those of C ⊙ G with C = outer(g scale, x scale); SOURCE's Adam step model fits
    its curvature so. None: the plain x and g."""
    fisher_samples: int = 1
    """Label draws per document under the true Fisher: a pass under sampled labels runs once per draw
    (draw k seeded ``seed + DRAW_STRIDE k``), and the statistics average over the draws."""

    def draws(self, labels: str) -> int:
        """The passes a statistic under ``labels`` takes: ``fisher_samples`` for sampled labels, else 1."""
        return self.fisher_samples if labels == "true" else 1


DRAW_STRIDE = 1_000_003
"""The seed offset between the label draws of ``--fisher_samples``."""


class Source(Protocol):
    """Where a pass's examples come from (see the module docstring)."""

    modules: Mapping[str, nn.Module]
    include_bias: bool
    num_rows: int | None
    """The number of rows of a pass's results (None: the number of examples seen)."""

    def run(self, desc: str, fn: Statistic, labels: str) -> int:
        """One pass handing every layer's x and g to ``fn``, with the loss under ``labels``
        ('true' or 'empirical' Fisher labels); returns the number of examples seen."""
        ...


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


class DocumentSource:
    """Documents with a loss token (of the documents ``only``, when given; rows are always
    indices into ``docs``), in length-sorted batches of at most ``token_batch_size`` tokens."""

    def __init__(
        self, model: nn.Module, docs: TokenizedDocs, opts: EkfacOptions, only: np.ndarray | None = None
    ):
        self.model, self.docs, self.opts, self.only = model, docs, opts, only
        self.modules = opts.modules
        self.include_bias = opts.include_bias
        self.num_rows: int | None = len(docs)

    def run(self, desc: str, fn: Statistic, labels: str) -> int:
        opts, docs = self.opts, self.docs
        lengths = np.where(docs.num_loss_tokens() > 0, docs.lengths, 0)
        if self.only is not None:
            keep = np.zeros(len(lengths), dtype=bool)
            keep[self.only] = True
            lengths = np.where(keep, lengths, 0)
        plan = plan_batches(lengths, opts.token_batch_size)
        scale = Scaler(opts.scales, opts.dtype)
        device = next(self.model.parameters()).device
        draws = opts.draws(labels)
        seen = 0
        for draw in range(draws):
            engine = PassEngine(
                self.model,
                fisher_loss(labels, opts.seed + DRAW_STRIDE * draw),
                idle_loss=idle_loss(opts.pad_token_id),
                size=lambda batch: batch.num_tokens,
                unit="tok",
                desc=desc if draws == 1 else f"{desc} (draw {draw + 1}/{draws})",
                progress=opts.progress,
            )

            def tap(name: str, x: torch.Tensor, g: torch.Tensor, engine: PassEngine = engine) -> None:
                batch = engine.batch
                if batch is None:  # an idle step of a sharded model
                    return
                x, g = scale(name, x, g)
                fn(name, x, g, batch.rows, batch.mask)

            seen += engine.run(
                document_batches(docs, plan, opts.pad_token_id, device),
                hooks=LayerTap(opts.modules, tap, opts.include_bias),
                steps=len(plan),
                total=int(lengths.sum()),
            )
        return seen


class Scaler:
    """Multiplies a layer's output gradients and inputs by its ``scales`` (see :class:`EkfacOptions`),
    in ``dtype``, moving each module's scales to the device once; modules without scales pass as they are."""

    def __init__(self, scales: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None, dtype: torch.dtype):
        self.scales, self.dtype = scales or {}, dtype
        self.moved: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, name: str, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self.scales:
            return x, g
        if name not in self.moved:
            sg, sx = self.scales[name]
            if sg.shape != g.shape[-1:] or sx.shape != x.shape[-1:]:
                raise BergsonError(
                    f"module {name!r}: scales of shapes {tuple(sg.shape)} and {tuple(sx.shape)} for "
                    f"output gradients of width {g.shape[-1]} and inputs of width {x.shape[-1]}"
                )
            self.moved[name] = (sg.to(g.device, self.dtype), sx.to(x.device, self.dtype))
        sg, sx = self.moved[name]
        return x.to(self.dtype) * sx, g.to(self.dtype) * sg


class BatchSource:
    """A custom model's ``batches`` and per-example ``loss_fn`` (which also chooses the
    Fisher's labels); rows number the examples in the order they are seen. ``scales`` as in
    :class:`EkfacOptions` (applied in float64)."""

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[Any],
        loss_fn: LossFn,
        modules: Mapping[str, nn.Module],
        include_bias: bool = False,
        progress: bool = True,
        scales: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ):
        self.model, self.batches, self.loss_fn = model, batches, loss_fn
        self.modules, self.include_bias, self.progress = modules, include_bias, progress
        self.num_rows: int | None = None
        self.scale = Scaler(scales, torch.float64)

    def run(self, desc: str, fn: Statistic, labels: str) -> int:
        engine = PassEngine(self.model, self.loss_fn, desc=desc, progress=self.progress)

        def tap(name: str, x: torch.Tensor, g: torch.Tensor) -> None:
            x, g = self.scale(name, x, g)
            fn(name, x, g, np.arange(engine.seen, engine.seen + x.shape[0]), None)

        return engine.run(self.batches, hooks=LayerTap(self.modules, tap, self.include_bias))


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


def input_dim(module: nn.Module, include_bias: bool) -> int:
    """The width of x at a tracked layer (plus the column of ones of a bias)."""
    return module_shape(module)[1] + int(include_bias and getattr(module, "bias", None) is not None)


def per_document_gradients(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """G_n = Σ_t g_t x_tᵀ for a batch: [B, out, in] (padding has g = 0, so it adds nothing)."""
    return g.mT.to(x.dtype) @ x


# ---------------------------------------------------------------------- the statistics


def covariance_sums(
    source: Source, dtype: torch.dtype, labels: str = "true"
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, int], int]:
    """Σ x xᵀ ("A") and Σ g gᵀ ("S") per module over the real positions, the number of those
    positions per module, and the number of examples seen."""
    sums: dict[str, dict[str, torch.Tensor]] = {}
    positions: dict[str, int] = {}

    def fn(name: str, x: torch.Tensor, g: torch.Tensor, rows: np.ndarray, mask: torch.Tensor | None) -> None:
        if mask is None:
            x, g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
        else:
            x, g = x[mask], g[mask]
        add_covariances(sums, name, x.to(dtype), g.to(dtype))
        positions[name] = positions.get(name, 0) + x.shape[0]

    n = source.run("covariances", fn, labels)
    finish_covariances(sums)
    for name, shape in _unseen(source, sums):  # a routed expert no token reached: no curvature
        device = next((d["A"].device for d in sums.values()), None)
        sums[name] = {k: torch.zeros(m, m, dtype=dtype, device=device) for k, m in zip("AS", shape[::-1])}
        positions[name] = 0
    return sums, positions, n


def _unseen(source: Source, seen: Mapping[str, Any]) -> list[tuple[str, tuple[int, int]]]:
    """The tracked modules no example reached (experts no token was routed to), with their (out,
    in) shape as the statistics see it (the bias column included); their statistics are zero."""
    return [
        (name, (module_shape(m)[0], input_dim(m, source.include_bias)))
        for name, m in source.modules.items()
        if name not in seen
    ]


def correction_sums(
    source: Source, eigen: Factors, dtype: torch.dtype, labels: str = "true"
) -> dict[str, torch.Tensor]:
    """Σ_n (Q_Sᵀ G_n Q_A)² (elementwise) per module, in the eigenbases of ``eigen``."""
    sums: dict[str, torch.Tensor] = {}
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def fn(name: str, x: torch.Tensor, g: torch.Tensor, rows: np.ndarray, mask: torch.Tensor | None) -> None:
        if name not in bases:  # converted once, not per batch (Q_S of an output head is large)
            d = eigen.tensors[name]
            bases[name] = (d["S_eigenvectors"].to(x.device, dtype), d["A_eigenvectors"].to(x.device, dtype))
        add_corrections(sums, name, bases[name], x.to(dtype), g.to(dtype), mask)

    source.run("eigenvalue correction", fn, labels)
    for name, shape in _unseen(source, sums):
        sums[name] = torch.zeros(shape, dtype=dtype, device=next((s.device for s in sums.values()), None))
    return sums


def example_gradients(source: Source, desc: str = "query gradients") -> dict[str, torch.Tensor]:
    """Per-example gradients G_n [N, out, in] (float64, on the CPU) of every module, with the
    dataset's labels; rows no batch holds are zero."""
    parts: dict[str, list[tuple[np.ndarray, torch.Tensor]]] = {}

    def fn(name: str, x: torch.Tensor, g: torch.Tensor, rows: np.ndarray, mask: torch.Tensor | None) -> None:
        parts.setdefault(name, []).append((rows, per_document_gradients(x.double(), g.double()).cpu()))

    seen = source.run(desc, fn, "empirical")
    num = source.num_rows if source.num_rows is not None else seen
    out: dict[str, torch.Tensor] = {}
    for name, pieces in parts.items():
        out[name] = torch.zeros(num, *pieces[0][1].shape[1:], dtype=torch.float64)
        for rows, grads in pieces:
            out[name][torch.as_tensor(rows)] = grads
    for name, shape in _unseen(source, out):  # an expert none of these examples reached
        out[name] = torch.zeros(num, *shape, dtype=torch.float64)
    return out


# ---------------------------------------------------------------------- over documents


def _zero_sums(sums: dict[str, Any], opts: EkfacOptions, make: Callable[[nn.Module], Any]) -> None:
    """Fill in the sums of modules a rank without documents never saw (before an all-reduce)."""
    for name, module in opts.modules.items():
        if name not in sums:
            sums[name] = make(module)


def fit_covariances(model: nn.Module, docs: TokenizedDocs, opts: EkfacOptions) -> Factors:
    """A = (1/T) Σ x xᵀ over real tokens, S = (1/N) Σ g gᵀ over documents with a loss token
    (on several ranks: each sums over its documents, then one all-reduce)."""
    source = DocumentSource(model, docs, opts, rank_documents(docs))
    sums, _, _ = covariance_sums(source, opts.dtype, opts.fisher)
    if distributed.world_size() > 1:
        device = next(model.parameters()).device

        def zeros(module: nn.Module) -> dict[str, torch.Tensor]:
            a, s = input_dim(module, opts.include_bias), module_shape(module)[0]
            return {
                "A": torch.zeros(a, a, dtype=opts.dtype, device=device),
                "S": torch.zeros(s, s, dtype=opts.dtype, device=device),
            }

        _zero_sums(sums, opts, zeros)
        sum_over_ranks([sums[name][key] for name in opts.modules for key in ("A", "S")])
    active = docs.num_loss_tokens() > 0
    tokens, n = int(docs.lengths[active].sum()), int(active.sum())
    if n == 0:
        raise BergsonError("no document has a loss token: the Fisher is undefined")
    draws = opts.draws(opts.fisher)  # every draw adds its tokens and documents once more
    factors = {name: {"A": d["A"] / (tokens * draws), "S": d["S"] / (n * draws)} for name, d in sums.items()}
    meta = {
        "stage": "covariances",
        "tokens": tokens,
        "documents": n,
        "fisher": opts.fisher,
        "seed": opts.seed,
    }
    return Factors(factors, {**meta, "fisher_samples": draws})


def fit_corrected_eigenvalues(
    model: nn.Module, docs: TokenizedDocs, eigen: Factors, opts: EkfacOptions
) -> Factors:
    """Λ[i, j] = (1/N) Σ_n (Q_Sᵀ G_n Q_A)[i, j]² with the same sampled labels as the covariances
    (on several ranks: each sums over its documents, then one all-reduce)."""
    dtype = torch.float64 if opts.dtype == torch.float64 else torch.float32
    source = DocumentSource(model, docs, opts, rank_documents(docs))
    sums = correction_sums(source, eigen, dtype, opts.fisher)
    if distributed.world_size() > 1:
        device = next(model.parameters()).device

        def zeros(module: nn.Module) -> torch.Tensor:
            shape = (module_shape(module)[0], input_dim(module, opts.include_bias))
            return torch.zeros(shape, dtype=dtype, device=device)

        _zero_sums(sums, opts, zeros)
        sum_over_ranks([sums[name] for name in opts.modules])
    n, draws = int((docs.num_loss_tokens() > 0).sum()), opts.draws(opts.fisher)
    return Factors(
        {name: {"eigenvalues": s.double() / (n * draws)} for name, s in sums.items()},
        {"stage": "corrected", "documents": n, "fisher_samples": draws},
    )


def query_gradients(model: nn.Module, docs: TokenizedDocs, opts: EkfacOptions) -> dict[str, torch.Tensor]:
    """Per-query gradients G_q [nq, out, in] of the queries' own (dataset-label) losses."""
    return example_gradients(DocumentSource(model, docs, opts))
