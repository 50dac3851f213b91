"""The collection loop: documents -> the pass engine with gradient hooks -> per-row vectors -> sink."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..core.layout import AttentionConfig
from ..core.rows import row_norms
from ..core.sinks import Sink
from ..data.batching import plan_batches, plan_shards
from ..data.tokenize import TokenizedDocs
from ..transforms.normalizers import Normalizer
from .engine import PassEngine
from .hooks import GradientCollector
from .losses import DocumentBatch, document_batches, idle_loss, lm_loss

logger = logging.getLogger(__name__)


class InMemorySink(Sink):
    """Keeps every row's vector in memory: ``vectors`` [rows, dim] in dataset order, and with
    per-token collection ``tokens[row]`` [num_tokens, dim]."""

    def __init__(self, num_rows: int, dims: Mapping[str, int]):
        self.dims = dict(dims)
        self.vectors = np.zeros((num_rows, sum(self.dims.values())), np.float64)
        self.num_tokens = np.zeros(num_rows, np.int64)
        self.loss = np.zeros(num_rows, np.float64)
        self.tokens: list[np.ndarray | None] = [None] * num_rows

    def write(self, row_ids, vectors, num_tokens, losses, tokens=None) -> None:  # types: Sink.write
        self.vectors[row_ids] = vectors
        self.num_tokens[row_ids] = num_tokens
        self.loss[row_ids] = losses
        for b, row in enumerate(np.asarray(row_ids)):
            n = int(num_tokens[b])
            self.tokens[row] = np.zeros((n, self.vectors.shape[1])) if tokens is None else tokens[b, :n]

    def by_module(self) -> dict[str, np.ndarray]:
        """Split the columns into one [rows, dim] array per module."""
        out, start = {}, 0
        for name, dim in self.dims.items():
            out[name] = self.vectors[:, start : start + dim]
            start += dim
        return out


def finish_rows(
    out: torch.Tensor,
    transform: Callable[[torch.Tensor], torch.Tensor] | None,
    unit_normalize: bool,
    per_token: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch's rows [B, dim] (and with ``per_token`` its token vectors [B, S, dim], which sum
    to the rows) from the hooks' output ``out``: ``transform`` applied to each vector, then with
    ``unit_normalize`` each row (and its tokens) divided by the row's norm."""
    tokens = out if per_token else None
    if tokens is not None:
        if transform is not None:
            tokens = transform(tokens.reshape(-1, tokens.shape[-1])).reshape(tokens.shape)
        vectors = tokens.sum(1)
    else:
        vectors = out if transform is None else transform(out)
    if unit_normalize:
        norm = row_norms(vectors)
        vectors = vectors / norm
        tokens = None if tokens is None else tokens / norm[:, None]
    return vectors, tokens


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
    aggregate_experts: bool = False,
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
    ``aggregate_experts`` sums each fused parameter's expert blocks into one (see :class:`GradientCollector`).
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
        aggregate_experts=aggregate_experts,
    )
    layouts = collector.layouts
    col = {m.name: (m.offset, m.offset + m.dim) for m in layouts}
    total_dim = sum(m.dim for m in layouts)
    if sink is None:
        sink = InMemorySink(len(docs), {m.name: m.dim for m in layouts})
    loss_fn = lm_loss(docs, loss_reduction)

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
    plans = {i: plan_batches(active_lengths[r.start : r.stop], token_batch_size) for i, r in todo}

    cdt = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    buf: torch.Tensor | None = None  # the batch's rows, filled block by block in the reverse pass

    def closure(name: str, vec: torch.Tensor) -> None:
        nonlocal buf
        if buf is None:
            buf = torch.zeros((*vec.shape[:-1], total_dim), dtype=cdt, device=vec.device)
        a, b = col[name]
        buf[..., a:b] += vec  # aggregated expert blocks: one call per expert

    collector.closure = closure

    def batches() -> Iterator[DocumentBatch]:
        """Shard by shard: the shard's rows without a loss token as zero rows, then its batches."""
        for index, rows in todo:
            sink.begin_shard(index, rows)
            idle = np.flatnonzero(active_lengths[rows.start : rows.stop] == 0) + rows.start
            if len(idle):
                zeros = np.zeros(len(idle), np.float32)
                sink.write(idle, np.zeros((len(idle), total_dim), np.float32), lengths[idle], zeros)
            yield from document_batches(docs, (p + rows.start for p in plans[index]), pad_token_id, device)
            sink.end_shard(index)

    def write(batch: DocumentBatch, losses: torch.Tensor) -> None:
        nonlocal buf
        rows, out, buf = batch.rows, buf, None
        if out is None:  # no tracked layer is reached from the loss
            shape = (len(rows), batch.ids.shape[1], total_dim) if per_token else (len(rows), total_dim)
            out = torch.zeros(shape, dtype=cdt, device=device)
        vectors, tokens = finish_rows(out, transform, unit_normalize, per_token)
        sink.write(
            rows,
            vectors.cpu().numpy(),
            lengths[rows],
            losses.float().cpu().numpy(),
            None if tokens is None else tokens.cpu().numpy(),
        )

    engine = PassEngine(
        model,
        loss_fn,
        idle_loss=idle_loss(pad_token_id),
        size=lambda batch: batch.num_tokens,
        unit="tok",
        desc="gradients",
        progress=progress,
    )
    engine.run(
        batches(), hooks=collector, on_batch=write, steps=sum(map(len, plans.values())), total=total_tokens
    )
    return sink
