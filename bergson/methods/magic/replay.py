"""Training as a differentiable function of the token weights: the recipe's optimizer steps
replayed over a model and its documents (:class:`Replay`), their vector-Jacobian products, and
the query loss whose gradient starts the reverse pass.

This is the one loop in bergson besides the pass engine: it differentiates through training
(a double backward through each step's gradient), so it owns its forward/backward calls, in
this module alone. Data parallel runs sum each rank's share of a step's gradient in one
all-reduce, differentiably.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ... import distributed
from ...collect.head_loss import trained_head_losses
from ...collect.losses import next_tokens
from ...collect.losses import token_losses as position_losses
from ...config import TrainingConfig
from ...data import TokenizedDocs
from ...data.batching import IGNORE, pad_batch
from ...errors import BergsonError
from .recipe import (
    State,
    Tensors,
    check_recipe,
    clip,
    learning_rate,
    optimizer_update,
    plan_steps,
    trained_names,
    zero_slots_state,
)

logger = logging.getLogger(__name__)


def token_losses(model: nn.Module, params: Tensors, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every position's next-token prediction under ``params``, [B, T] (0 where
    the target is IGNORE): through the fused output head where the model allows it (neither the
    [B, T, V] logits nor their log-softmax kept for the reverse pass), otherwise from the logits
    (half-precision logits upcast)."""
    from torch.func import functional_call

    # the parameters that are not trained go in detached: no gradient is taken at them
    full = {n: p.detach() for n, p in model.named_parameters() if n not in params}
    full.update(params)
    return trained_head_losses(
        model,
        lambda: functional_call(model, full, (ids,), {"use_cache": False}).logits,
        target,
        lambda logits: position_losses(logits, target),
    )


@dataclass
class MicroBatch:
    ids: torch.Tensor  # [B, T]
    target: torch.Tensor  # [B, T] next-token target of position t (IGNORE where none)
    weight_index: torch.Tensor  # [B, T] index into the flat token-weight vector (0 where no loss)
    mask: torch.Tensor  # [B, T] bool: position t's prediction carries loss

    def share(self, rank: int, world: int) -> MicroBatch:
        """Rows rank, rank + world, ... (one rank's documents under data parallelism)."""
        return MicroBatch(*(x[rank::world] for x in (self.ids, self.target, self.weight_index, self.mask)))


@dataclass
class StepGraph:
    """One optimizer step built with its graph (:meth:`Replay.step_graph`): the leaves it
    differentiates with respect to (the state before the step and the token weights) and the
    state after it, still attached to the graph."""

    leaf: State
    weights: torch.Tensor
    new: State


class _SumOverRanks(torch.autograd.Function):
    """Forward: the sum of a tensor over the ranks. Backward: the cotangent as it is, because
    everything downstream (the optimizer update) runs identically on every rank."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce_sum(x.clone())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _ScaleGrad(torch.autograd.Function):
    """Forward: the identity. Backward: the cotangent times ``factor``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def sum_gradients_over_ranks(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each rank's gradient of its own documents' share of the loss, summed over the ranks in
    one all-reduce (differentiable: each rank's share receives the replicated cotangent)."""
    if distributed.world_size() == 1:
        return grads
    total = _SumOverRanks.apply(torch.cat([g.reshape(-1) for g in grads]))
    return [x.view_as(g) for x, g in zip(total.split([g.numel() for g in grads]), grads)]


class TokenWeights:
    """The flat layout of per-token weights: document i's token j is ``offsets[i] + j``."""

    def __init__(self, docs: TokenizedDocs):
        self.lengths = docs.lengths
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)

    @property
    def size(self) -> int:
        return int(self.offsets[-1])

    def per_document(self, token_values: np.ndarray) -> np.ndarray:
        """Sum a [tokens, ...] array over each document's tokens: [documents, ...]."""
        csum = np.concatenate([np.zeros((1, *token_values.shape[1:])), np.cumsum(token_values, 0)])
        return csum[self.offsets[1:]] - csum[self.offsets[:-1]]

    def ones_except(self, removed_documents: Sequence[int] | np.ndarray) -> np.ndarray:
        w = np.ones(self.size)
        for i in removed_documents:
            w[self.offsets[i] : self.offsets[i + 1]] = 0.0
        return w


class Replay:
    """A training recipe over a model and documents, replayable step by step.

    ``step(state, t, weights)`` is the t-th optimizer step as a function of the state and
    the flat token weights (differentiable in both when ``create_graph``).
    """

    def __init__(
        self,
        model: nn.Module,
        docs: TokenizedDocs,
        recipe: TrainingConfig,
        pad_token_id: int = 0,
        progress: bool = True,
    ):
        self.model = model
        self.docs = docs
        self.recipe = recipe
        self.pad_token_id = pad_token_id
        self.progress = progress
        self.device = next(model.parameters()).device
        self.names = trained_names([n for n, p in model.named_parameters() if p.requires_grad], recipe.freeze)
        check_recipe(recipe)
        self.plan = plan_steps(len(docs), recipe)
        self.layout = TokenWeights(docs)
        self._batches: dict[int, list[MicroBatch]] = {}
        params = dict(model.named_parameters())
        self._initial = {n: params[n].detach().clone() for n in self.names}

    @property
    def num_steps(self) -> int:
        return len(self.plan)

    def micro_batches(self, step: int) -> list[MicroBatch]:
        cached = self._batches.get(step)
        if cached is not None:
            return cached
        out = []
        for idx in self.plan[step]:
            ids, labels = pad_batch(self.docs, idx, self.pad_token_id)
            target = next_tokens(labels)
            mask = target != IGNORE
            # the prediction at position t is scored on token t + 1: its weight lives there
            pos = torch.arange(1, ids.shape[1] + 1)[None].expand_as(ids)
            offsets = torch.as_tensor(self.layout.offsets[idx])[:, None]
            index = torch.where(mask, offsets + pos, torch.zeros_like(pos))
            out.append(
                MicroBatch(
                    ids.to(self.device), target.to(self.device), index.to(self.device), mask.to(self.device)
                )
            )
        self._batches[step] = out
        return out

    def initial_state(self) -> State:
        return zero_slots_state(self.recipe, {k: v.clone() for k, v in self._initial.items()})

    def step(
        self, state: State, t: int, weights: torch.Tensor, create_graph: bool = False
    ) -> tuple[State, float]:
        """Optimizer step ``t`` from ``state``; returns the new state and the step's loss."""
        batches = self.micro_batches(t)
        w = [
            torch.where(
                b.mask, weights[b.weight_index], torch.zeros((), dtype=weights.dtype, device=weights.device)
            )
            for b in batches
        ]
        denom = torch.stack([x.sum() for x in w]).sum().clamp(min=1e-12)
        params = state.params
        keys = list(params)
        grads: list[torch.Tensor] | None = None
        total = 0.0
        world, me = distributed.world_size(), distributed.rank()
        if world > 1:  # data parallel: each rank its share of every micro-batch's documents
            batches, w = [b.share(me, world) for b in batches], [x[me::world] for x in w]
        with torch.enable_grad():
            for b, wb in zip(batches, w):
                if not len(b.ids):
                    continue
                leaves = (
                    params
                    if create_graph
                    else {k: v.detach().requires_grad_(True) for k, v in params.items()}
                )
                loss = (
                    token_losses(self.model, leaves, b.ids, b.target) * wb.to(params[keys[0]].dtype)
                ).sum() / denom
                g = torch.autograd.grad(loss, [leaves[k] for k in keys], create_graph=create_graph)
                grads = list(g) if grads is None else [a + c for a, c in zip(grads, g)]
                total += float(loss.detach())
        if grads is None:  # no documents of this step on this rank
            grads = [torch.zeros_like(params[k]) for k in keys]
        if world > 1:
            grads = sum_gradients_over_ranks(grads)
            total = float(distributed.all_reduce_sum(torch.tensor([total], dtype=torch.float64)).item())
            if create_graph:  # on every rank: the update's own (replicated) term, 1/world of it
                state = state.like([_ScaleGrad.apply(x, 1.0 / world) for x in state.tensors()])
        gd = clip(dict(zip(keys, grads)), self.recipe.max_grad_norm)
        lr = learning_rate(self.recipe, t, self.num_steps)
        if create_graph:
            return optimizer_update(self.recipe, state, gd, t, lr), total
        with torch.no_grad():
            return optimizer_update(
                self.recipe, state.detached(), {k: v.detach() for k, v in gd.items()}, t, lr
            ), total

    def step_graph(self, state: State, t: int, weights: torch.Tensor) -> StepGraph:
        """Step ``t`` at ``state`` with the graph that its vector-Jacobian products differentiate:
        the forward and the create_graph gradient, which all of a step's cotangents share."""
        leaf = state.detached(requires_grad=True)
        w = weights.detach().requires_grad_(True)  # a new leaf sharing storage, no copy
        with math_attention():
            new, _ = self.step(leaf, t, w, create_graph=True)
        return StepGraph(leaf, w, new)

    def step_vjp(
        self, state: State, t: int, weights: torch.Tensor, cotangent: State, batched: str = "vmap"
    ) -> tuple[State, torch.Tensor]:
        """The vector-Jacobian product of step ``t`` at ``state`` for a batch of Q cotangents
        (:meth:`step_graph`, then :meth:`graph_vjp`)."""
        return self.graph_vjp(self.step_graph(state, t, weights), cotangent, batched)

    def graph_vjp(
        self, graph: StepGraph, cotangent: State, batched: str = "vmap"
    ) -> tuple[State, torch.Tensor]:
        """The vector-Jacobian product of a step's graph for a batch of Q cotangents.

        ``cotangent`` holds Q cotangents of the state after the step, stacked on a leading
        dimension of every tensor; returns the Q cotangents of the state before it (stacked
        likewise) and the gradients with respect to the token weights, [Q, tokens] (summed over
        the ranks of a data-parallel run). Only this second backward runs per cotangent:
        vectorized over the batch (``batched="vmap"``, ``is_grads_batched``) or one after
        another on the retained graph (``"loop"``). The graph is released afterwards."""
        outs, grads_out = [], []
        for o, c in zip(graph.new.tensors(), cotangent.tensors()):
            if o.requires_grad and bool(c.any()):
                outs.append(o)
                grads_out.append(c)
        inputs = [*graph.leaf.tensors(), graph.weights]
        q = len(cotangent.tensors()[0])
        if q == 1 or batched == "loop":
            per = [
                torch.autograd.grad(
                    outs, inputs, [c[i] for c in grads_out], allow_unused=True, retain_graph=i < q - 1
                )
                for i in range(q)
            ]
            got = [None if g[0] is None else torch.stack(g) for g in zip(*per)]
        else:
            got = list(torch.autograd.grad(outs, inputs, grads_out, allow_unused=True, is_grads_batched=True))
        flat = [
            torch.zeros((q, *x.shape), dtype=x.dtype, device=x.device) if g is None else g.detach()
            for x, g in zip(inputs, got)
        ]
        # each rank holds 1/world of the update's own term plus its documents' terms
        flat = sum_gradients_over_ranks(flat)
        return graph.leaf.like(flat[:-1]), flat[-1]

    def run(self, weights: torch.Tensor | None = None) -> tuple[State, list[float]]:
        """The whole run without a graph (token weights default to ones): final state, step losses."""
        w = self.ones() if weights is None else weights
        s = self.initial_state()
        losses = []
        with math_attention():
            for t in tqdm(range(self.num_steps), desc="training", unit="step", disable=not self.progress):
                s, loss = self.step(s, t, w)
                losses.append(loss)
        return s, losses

    def ones(self) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        return torch.ones(self.layout.size, dtype=dtype, device=self.device)


def query_losses(
    model: nn.Module, params: Tensors, queries: TokenizedDocs, pad_token_id: int = 0, batch_size: int = 16
) -> torch.Tensor:
    """Mean next-token cross-entropy of each query document under ``params``: [nq]."""
    device = next(iter(params.values())).device
    out = []
    for i in range(0, len(queries), batch_size):
        idx = np.arange(i, min(i + batch_size, len(queries)))
        ids, labels = pad_batch(queries, idx, pad_token_id)
        ids, labels = ids.to(device), labels.to(device)
        target = next_tokens(labels)
        ce = token_losses(model, params, ids, target)
        n = (target != IGNORE).sum(1)
        if bool((n == 0).any()):
            raise BergsonError(f"query row {int(idx[int((n == 0).nonzero()[0])])} has no loss token")
        out.append(ce.sum(1) / n)
    return torch.cat(out)


def query_gradient(
    model: nn.Module, params: Tensors, queries: TokenizedDocs, pad_token_id: int = 0
) -> Tensors:
    """∂Q/∂θ of the mean query loss Q at ``params``: the cotangent that starts a reverse pass."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    with math_attention():
        q = query_losses(model, leaves, queries, pad_token_id).mean()
    return dict(zip(leaves, torch.autograd.grad(q, list(leaves.values()))))


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """The math SDPA kernel: it supports double backward everywhere (flash and
    memory-efficient kernels do not), and using it in every pass keeps replays identical."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def use_double_backward_attention(model: nn.Module) -> None:
    """Switch attention kernels without double-backward support (flash attention and other
    hub kernels) to SDPA, which :func:`math_attention` then pins to its math kernel."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl in (None, "eager", "sdpa"):
        return
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None:
        raise BergsonError(
            f"the model's attention implementation {impl!r} has no double backward; load it with "
            "attn_implementation='sdpa' or 'eager'"
        )
    logger.info("attention %r has no double backward: using sdpa (math kernel) instead", impl)
    setter("sdpa")
