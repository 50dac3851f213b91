"""The collection loop: batches -> forward/backward with hooks -> per-row vectors -> sink."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..core.layout import AttentionConfig
from ..data.batching import IGNORE, pad_batch, plan_batches, plan_shards
from ..data.tokenize import TokenizedDocs
from ..transforms.normalizers import Normalizer
from .hooks import GradientCollector

logger = logging.getLogger(__name__)


class Sink(Protocol):
    """Where the loop sends per-row vectors, one shard (range of dataset rows) at a time.

    ``num_tokens`` are the rows' lengths; with per-token collection ``tokens`` [B, S, dim]
    holds each position's vector (row b's first ``num_tokens[b]`` positions are its own)."""

    def done(self, index: int) -> bool: ...
    def begin_shard(self, index: int, rows: range) -> None: ...
    def write(
        self,
        row_ids: np.ndarray,
        vectors: np.ndarray,
        num_tokens: np.ndarray,
        losses: np.ndarray,
        tokens: np.ndarray | None = None,
    ) -> None: ...
    def end_shard(self, index: int) -> None: ...


class InMemorySink:
    """Keeps every row's vector in memory: ``vectors`` [rows, dim] in dataset order, and with
    per-token collection ``tokens[row]`` [num_tokens, dim]."""

    def __init__(self, num_rows: int, dims: Mapping[str, int]):
        self.dims = dict(dims)
        self.vectors = np.zeros((num_rows, sum(self.dims.values())), np.float64)
        self.num_tokens = np.zeros(num_rows, np.int64)
        self.loss = np.zeros(num_rows, np.float64)
        self.tokens: list[np.ndarray | None] = [None] * num_rows

    def done(self, index: int) -> bool:
        return False

    def begin_shard(self, index: int, rows: range) -> None:
        pass

    def write(
        self,
        row_ids: np.ndarray,
        vectors: np.ndarray,
        num_tokens: np.ndarray,
        losses: np.ndarray,
        tokens: np.ndarray | None = None,
    ) -> None:
        self.vectors[row_ids] = vectors
        self.num_tokens[row_ids] = num_tokens
        self.loss[row_ids] = losses
        for b, row in enumerate(np.asarray(row_ids)):
            n = int(num_tokens[b])
            self.tokens[row] = np.zeros((n, self.vectors.shape[1])) if tokens is None else tokens[b, :n]

    def end_shard(self, index: int) -> None:
        pass

    def by_module(self) -> dict[str, np.ndarray]:
        """Split the columns into one [rows, dim] array per module."""
        out, start = {}, 0
        for name, dim in self.dims.items():
            out[name] = self.vectors[:, start : start + dim]
            start += dim
        return out


def per_document_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Next-token cross-entropy per document, [B]; labels equal to -100 carry no loss.

    ``labels`` are aligned with the inputs (the shift happens here), as in Hugging Face
    models. ``reduction`` is 'sum' over the document's loss tokens or their 'mean'.
    """
    # Shift the labels rather than the logits: slicing [B, T, V] logits would copy them
    # forward and fill a zero tensor of the same size in backward.
    target = torch.full_like(labels, IGNORE)
    target[:, :-1] = labels[:, 1:]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        target.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    ).view(target.shape)
    total = ce.sum(1)
    if reduction == "mean":
        return total / (target != IGNORE).sum(1).clamp(min=1)
    if reduction != "sum":
        raise ValueError(f"unknown loss reduction {reduction!r}")
    return total


def idle_step(model: nn.Module, pad_token_id: int) -> None:
    """A forward and backward of one padding token whose result is thrown away: what a rank
    with no batch left runs while the others finish theirs, when the model is sharded (FSDP's
    weight gathers are collective, so every rank takes part in every step)."""
    device = next(model.parameters()).device
    ids = torch.full((1, 1), pad_token_id, dtype=torch.long, device=device)
    logits = model(input_ids=ids, use_cache=False).logits
    (logits.float().sum() * 0.0).backward()


def collect_gradients(
    model: nn.Module,
    docs: TokenizedDocs,
    *,
    sink: Sink | None = None,
    modules: Mapping[str, nn.Module] | Sequence[str] | None = None,
    projection_dim: int = 16,
    seed: int = 0,
    include_bias: bool = False,
    normalizers: Mapping[str, Normalizer] | None = None,
    token_batch_size: int = 2048,
    loss_reduction: str = "sum",
    unit_normalize: bool = False,
    shard_size: int | None = None,
    pad_token_id: int = 0,
    progress: bool = True,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    heads: Mapping[str, AttentionConfig] | Sequence[str] | None = None,
    per_token: bool = False,
    only_shards: Collection[int] | None = None,
) -> Sink:
    """Compute every document's per-example gradient vector and hand it to ``sink``.

    Rows are processed shard by shard (``shard_size`` consecutive documents; one shard by
    default); shards the sink reports as done are skipped. Within a shard, documents are
    length-sorted and packed into batches of at most ``token_batch_size`` padded tokens.
    Without a sink, an :class:`InMemorySink` is filled and returned. ``transform`` maps
    each batch's [B, dim] vectors (e.g. a preconditioner) before unit normalization.
    ``heads`` splits modules into attention-head blocks (see :class:`GradientCollector`).
    ``per_token`` also hands the sink every position's vector (summing to the row's vector;
    transforms apply to each, and unit normalization divides them by the row's norm).
    ``only_shards`` restricts the pass to those shard indices (one rank's share; None: all).
    """
    collector = GradientCollector(
        model,
        modules,
        projection_dim=projection_dim,
        seed=seed,
        include_bias=include_bias,
        normalizers=normalizers,
        heads=heads,
        per_token=per_token,
    )
    dims = collector.dims
    offsets = np.cumsum([0, *dims.values()])
    col = {name: (int(offsets[i]), int(offsets[i + 1])) for i, name in enumerate(dims)}
    total_dim = int(offsets[-1])
    if sink is None:
        sink = InMemorySink(len(docs), dims)

    device = next(model.parameters()).device
    lengths = docs.lengths
    active_lengths = np.where(docs.num_loss_tokens() > 0, lengths, 0)
    shards = plan_shards(len(docs), shard_size or max(len(docs), 1))
    wanted = None if only_shards is None else set(only_shards)
    mine = [(i, r) for i, r in enumerate(shards) if wanted is None or i in wanted]
    todo = [(i, r) for i, r in mine if not sink.done(i)]
    if len(todo) < len(mine):
        logger.info("%d of %d shards already complete; resuming", len(mine) - len(todo), len(mine))
    total_tokens = int(sum(active_lengths[r.start : r.stop].sum() for _, r in todo))

    cdt = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    buf: torch.Tensor | None = None

    def closure(name: str, vec: torch.Tensor) -> None:
        assert buf is not None
        a, b = col[name]
        buf[..., a:b] = vec

    collector.closure = closure
    saved = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    plans = {i: plan_batches(active_lengths[r.start : r.stop], token_batch_size) for i, r in todo}
    steps = sum(map(len, plans.values()))
    idle_steps = distributed.lockstep(model, steps) - steps
    bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="gradients", disable=not progress)
    try:
        with collector:
            for index, rows in todo:
                sink.begin_shard(index, rows)
                shard_lengths = active_lengths[rows.start : rows.stop]
                idle = np.flatnonzero(shard_lengths == 0)
                if len(idle):
                    sink.write(
                        idle + rows.start,
                        np.zeros((len(idle), total_dim), np.float32),
                        lengths[idle + rows.start],
                        np.zeros(len(idle), np.float32),
                    )
                for local in plans[index]:
                    idx = local + rows.start
                    ids, labels = pad_batch(docs, idx, pad_token_id)
                    ids, labels = ids.to(device), labels.to(device)
                    shape = (len(idx), ids.shape[1], total_dim) if per_token else (len(idx), total_dim)
                    buf = torch.zeros(shape, dtype=cdt, device=device)
                    logits = model(input_ids=ids, use_cache=False).logits
                    losses = per_document_loss(logits, labels, loss_reduction)
                    if docs.weights is not None:
                        losses = losses * torch.as_tensor(
                            docs.weights[idx], dtype=losses.dtype, device=device
                        )
                    losses.sum().backward()
                    tokens = buf if per_token else None
                    if tokens is not None and transform is not None:
                        tokens = transform(tokens.reshape(-1, total_dim)).reshape(tokens.shape)
                    if tokens is not None:
                        vectors = tokens.sum(1)
                    else:
                        vectors = buf if transform is None else transform(buf)
                    if unit_normalize:
                        norm = vectors.norm(dim=1, keepdim=True).clamp(min=torch.finfo(cdt).tiny)
                        vectors = vectors / norm
                        tokens = None if tokens is None else tokens / norm[:, None]
                    sink.write(
                        idx,
                        vectors.cpu().numpy(),
                        lengths[idx],
                        losses.detach().float().cpu().numpy(),
                        None if tokens is None else tokens.cpu().numpy(),
                    )
                    bar.update(int(shard_lengths[local].sum()))
                sink.end_shard(index)
            for _ in range(idle_steps):
                buf = torch.zeros(
                    (1, 1, total_dim) if per_token else (1, total_dim), dtype=cdt, device=device
                )
                idle_step(model, pad_token_id)
    finally:
        bar.close()
        for p, flag in saved.items():
            p.requires_grad_(flag)
    return sink
