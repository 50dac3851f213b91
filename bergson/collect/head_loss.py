"""The next-token loss of each document without the [B, T, V] logits.

A pass that does not track the output head only needs, from the loss, the gradient at the
head's input. :func:`document_losses` computes it in the forward, block by block of loss
tokens: the block's logits h Wᵀ, their log-sum-exp, the token losses, then, in the same
buffer, softmax − one-hot, and (softmax − one-hot) W, the gradient at h. The full logits, the
log-softmax and the cross-entropy's reverse-pass tensors (each [B, T, V], for an 8k to 50k
vocabulary the largest tensors of a small model's pass) are never made, and padding and prompt
positions get no logits at all. The reverse pass scales the kept gradients by the upstream
ones. A true Fisher's labels are drawn in the same loop (blocks then hold whole documents), from
each document's own rows, by the caller's sampler.

It is used when the model's logits are its output head (:meth:`get_output_embeddings`, a plain
``nn.Linear`` whose weights need no gradient and that no hook watches) applied to the head's
input, with nothing after it. That is checked on the model's first batch: the head is called for
real, once, and the model must return that very tensor as its logits (a soft-capped, scaled or
upcast output is another tensor, and such a model keeps the ordinary route from then on). Later
batches hand the model a stand-in for the logits (a zero expanded to [B, T, V], no memory) and
check that it comes back untouched. Every batch of a model that passes the check, its first
included, gets its loss through the fused head, so results do not depend on which batch came
first. Models sharded with FSDP keep the ordinary route.

MAGIC's replay trains the head and differentiates through the training step's gradient, so it
takes :func:`trained_head_losses` instead: :class:`_TrainedHeadCrossEntropy` keeps only the
rows' softmax for the reverse pass, and its gradient (:class:`_TrainedHeadGrad`) has a
hand-written backward, the second-order term, in five matrix products and three elementwise
passes over [N, V]. The same check of the model's logits decides the route; a head with a bias or
half-precision weights keeps the route through the logits.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batching import IGNORE

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 24
"""The float32 logits of one block of tokens: small enough to stay in a CPU's caches."""

_PLAIN: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
"""Per model: whether its logits are its head's output (None until its first batch)."""


Sampler = Callable[[int, torch.Tensor], torch.Tensor]
"""``sample(b, logits)``: the targets [n] of batch row b's loss positions, drawn from their
float logits [n, V] (a true Fisher's labels)."""


def _block_rows(hidden: torch.Tensor, vocab: int) -> int:
    """Rows of one block: its logits fill about :data:`CHUNK_BYTES` on a CPU, 16 times that on a GPU."""
    per_row = vocab * (8 if hidden.dtype == torch.float64 else 4)
    if hidden.device.type == "cpu":
        return max(16, CHUNK_BYTES // per_row)
    return max(256, 16 * CHUNK_BYTES // per_row)


class _HeadCrossEntropy(torch.autograd.Function):
    """Token losses of rows h [N, d] under a linear head (W [V, d], b) and targets [N]; the
    gradient at h is computed in the forward and scaled in the reverse pass. With a sampler,
    the targets of each document are drawn from its own rows' logits first."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        docs: list[tuple[int, int, int]] | None,
        sample: Sampler | None,
    ) -> torch.Tensor:
        n = hidden.shape[0]
        upcast = hidden.dtype in (torch.float16, torch.bfloat16)
        losses = torch.empty(n, dtype=torch.float32 if upcast else hidden.dtype, device=hidden.device)
        grad = torch.empty_like(hidden)
        for start, stop, block_docs in _plan(n, _block_rows(hidden, weight.shape[0]), docs):
            logits = F.linear(hidden[start:stop], weight, bias)
            if upcast:
                logits = logits.float()
            tgt = target[start:stop]
            if sample is not None:
                tgt = torch.cat([sample(b, logits[a - start : z - start]) for b, a, z in block_docs])
            picked = logits.gather(1, tgt[:, None]).squeeze(1)
            probs, lse = _softmax_(logits)
            torch.sub(lse, picked, out=losses[start:stop])
            probs[torch.arange(stop - start, device=probs.device), tgt] -= 1
            if upcast:
                grad[start:stop] = probs.to(hidden.dtype) @ weight
            else:
                torch.mm(probs, weight, out=grad[start:stop])
        ctx.save_for_backward(grad)
        return losses

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * upstream[:, None].to(grad.dtype), None, None, None, None, None


class _TrainedHeadCrossEntropy(torch.autograd.Function):
    """Token losses of rows h [N, d] under a head W [V, d] without bias, and targets [N], for a
    head that is trained: its gradient is taken at h and W, and can be differentiated again.
    Only the rows' softmax P is kept; the [N, V] logits, log-softmax and one-hot are not."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        logits = torch.mm(hidden, weight.t())
        picked = logits.gather(1, target[:, None]).squeeze(1)
        probs, lse = _softmax_(logits)  # over the logits, in place
        ctx.save_for_backward(hidden, weight, probs, target)
        return lse - picked  # exact where the target's probability underflows

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        hidden, weight, probs, target = ctx.saved_tensors
        want_weight = ctx.needs_input_grad[1]
        grad_h, grad_w = _TrainedHeadGrad.apply(hidden, weight, upstream, probs, target, want_weight)
        return grad_h, grad_w if want_weight else None, None


class _TrainedHeadGrad(torch.autograd.Function):
    """The gradients at h and W of Σₙ gₙ CEₙ: with G = diag(g)(P − onehot), G W and Gᵀ h, without
    forming G. Its backward is the second-order term (a reverse pass through a training step),
    with the dependence of the kept softmax P on h and W applied analytically: for cotangents
    C_h and C_W of the two gradients, D = C_h Wᵀ + h C_Wᵀ is the cotangent of G, and the logits'
    cotangent is g ⊙ P ⊙ (D − ⟨P, D⟩) (the softmax's Jacobian)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        upstream: torch.Tensor,
        probs: torch.Tensor,
        target: torch.Tensor,
        want_weight: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(hidden, weight, upstream, probs, target)
        scale = upstream[:, None]
        grad_h = torch.mm(probs, weight).sub_(weight.index_select(0, target)).mul_(scale)
        if not want_weight:  # a frozen head: no [V, d] product
            return grad_h, weight.new_empty(0)
        scaled = hidden * scale
        grad_w = torch.mm(probs.t(), scaled).index_add_(0, target, scaled, alpha=-1)
        return grad_h, grad_w

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, cot_h: torch.Tensor | None, cot_w: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, upstream, probs, target = ctx.saved_tensors
        if cot_h is None:
            cot_h = torch.zeros_like(hidden)
        if cot_w is not None and cot_w.numel() == 0:  # a frozen head's gradient has no cotangent
            cot_w = None
        if cot_w is not None:  # D = C_h Wᵀ + h C_Wᵀ: one product
            d = torch.mm(torch.cat([cot_h, hidden], 1), torch.cat([weight, cot_w], 1).t())
        else:
            d = torch.mm(cot_h, weight.t())
        inner = torch.linalg.vecdot(probs, d)  # ⟨Pₙ, Dₙ⟩
        d_up = inner - d.gather(1, target[:, None]).squeeze(1)  # ⟨P − onehot, D⟩ per row
        d.sub_(inner[:, None]).mul_(probs)  # the logits' cotangent, less its factor g
        scale = upstream[:, None]
        d_h = torch.mm(d, weight)
        if cot_w is not None:
            d_h.addmm_(probs, cot_w).sub_(cot_w.index_select(0, target))
        d_h.mul_(scale)
        d_w = None
        if ctx.needs_input_grad[1]:
            scaled = cot_h * scale
            d_w = torch.mm(d.t(), hidden * scale).addmm_(probs.t(), scaled)
            d_w.index_add_(0, target, scaled, alpha=-1)
        return d_h, d_w, d_up, None, None, None


def _softmax_(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax of each row of ``logits`` [n, V], written over them, and the rows'
    log-sum-exp [n]. One exponential per entry: ``torch.logsumexp`` followed by
    ``(logits - lse).exp_()`` takes two, and its shift allocates a copy of the block."""
    top = logits.amax(1, keepdim=True)
    probs = logits.sub_(top).exp_()
    total = probs.sum(1, keepdim=True)
    probs.div_(total)
    return probs, (top + total.log()).squeeze(1)


def _plan(
    n: int, size: int, docs: list[tuple[int, int, int]] | None
) -> list[tuple[int, int, list[tuple[int, int, int]]]]:
    """Blocks of at most ``size`` rows: (start, stop, the documents in it). With ``docs`` (batch
    row, first row, end row of each document, in order), blocks hold whole documents; a
    document longer than ``size`` is a block of its own."""
    if docs is None:
        return [(a, min(n, a + size), []) for a in range(0, n, size)]
    out: list[tuple[int, int, list[tuple[int, int, int]]]] = []
    for doc in docs:
        if out and doc[2] - out[-1][0] <= size:
            out[-1] = (out[-1][0], doc[2], [*out[-1][2], doc])
        else:
            out.append((doc[1], doc[2], [doc]))
    return out


def _loss_rows(hidden: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The head's input rows [n, d] of the positions of ``target`` [B, T] that carry a loss,
    their targets [n], and the positions in the flattened [B·T] layout [n]."""
    flat = target.reshape(-1)
    pos = (flat != IGNORE).nonzero().squeeze(1)
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, pos), flat[pos], pos


def head_cross_entropy(
    hidden: torch.Tensor,
    head: nn.Linear,
    target: torch.Tensor,
    reduction: str = "sum",
    sample: Sampler | None = None,
) -> torch.Tensor:
    """Each document's next-token cross-entropy, [B], from the head's input ``hidden`` [B, T, d]
    and ``target`` [B, T] (the next token; the ignore index where there is no loss): equal to
    the cross-entropy of ``head(hidden)`` to rounding, without forming it. With ``sample``, the
    targets at the loss positions are drawn by it, one document at a time. Only ``hidden``
    gets a gradient."""
    batch, seq, _ = hidden.shape
    rows, targets, pos = _loss_rows(hidden, target)
    doc = torch.div(pos, seq, rounding_mode="floor")
    spans = None
    if sample is not None:
        counts = torch.bincount(doc, minlength=batch).tolist()
        ends = torch.tensor(counts).cumsum(0).tolist()
        spans = [(b, ends[b] - counts[b], ends[b]) for b in range(batch) if counts[b]]
    token = _HeadCrossEntropy.apply(rows, head.weight, head.bias, targets, spans, sample)
    return reduce_documents(token.new_zeros(batch).index_add(0, doc, token), target, reduction)


def reduce_documents(total: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    """Each document's summed token loss ``total`` [B] as the loss ``reduction`` asks: the sum
    itself, or its mean over the document's loss tokens (those of ``target`` [B, T] that are not
    the ignore index)."""
    if reduction == "mean":
        return total / (target != IGNORE).sum(1).clamp(min=1)
    return total


def _fusable_head(model: nn.Module, trained: bool = False) -> nn.Linear | None:
    """The model's output head when the fused loss may replace it (see the module docstring).
    A ``trained`` head (MAGIC's replay) may need gradients, but must have no bias and float32 or
    float64 weights (:class:`_TrainedHeadCrossEntropy`)."""
    if _PLAIN.get(model) is False:
        return None
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not nn.Linear:  # quantized and other subclasses keep their own forward
        return None
    params = [p for p in (head.weight, head.bias) if p is not None]
    if any(type(p) is not nn.Parameter for p in params):  # a sharded head
        return None
    if trained:
        if head.bias is not None or head.weight.dtype not in (torch.float32, torch.float64):
            return None
    elif any(p.requires_grad for p in params):  # a tracked head
        return None
    if head._forward_hooks or head._forward_pre_hooks or head._backward_hooks or head._backward_pre_hooks:
        return None
    return head


def _head_input(
    model: nn.Module, run: Callable[[], torch.Tensor], target: torch.Tensor, trained: bool = False
) -> tuple[torch.Tensor, nn.Linear, torch.Tensor] | torch.Tensor:
    """Run the model (``run()`` returns its logits) with its head intercepted where the fused
    loss may replace it (:func:`_fusable_head`): (the head's input, the head, the weight it was
    called with) when the logits are the head's own output, otherwise the logits. On a model's
    first batch the head is run for real, to check that the model returns that very tensor;
    later batches get a stand-in (a zero expanded to [B, T, V])."""
    head = _fusable_head(model, trained)
    if head is None:
        return run()
    known = model in _PLAIN
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (input, output, weight)

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        if known:  # a stand-in for the logits: a zero expanded to [B, T, V], no memory
            out = hidden.new_zeros(()).expand(*hidden.shape[:-1], head.out_features)
        else:
            out = nn.Linear.forward(head, hidden)
        calls.append((hidden, out, head.weight))  # the weight in use (torch.func swaps it in)
        return out

    head.forward = forward  # type: ignore[method-assign]
    try:
        logits = run()
    finally:
        del head.forward
    plain = len(calls) == 1 and logits is calls[0][1] and calls[0][0].shape[:-1] == target.shape
    if not known:
        _PLAIN[model] = plain
        if not plain:
            logger.debug(
                "%s: its logits are not its output head's own output (soft-capped, scaled or upcast): "
                "the loss goes through the full logits",
                type(model).__name__,
            )
            return logits
    elif not plain:
        raise RuntimeError(
            "the model changed its logits after its first batch, so its output head cannot be fused; "
            "this is a bug of bergson, please report it with the model's class"
        )
    return calls[0][0], head, calls[0][2]


def document_losses(
    model: nn.Module,
    ids: torch.Tensor,
    target: torch.Tensor,
    reduction: str,
    from_logits: Callable[[torch.Tensor], torch.Tensor],
    sample: Sampler | None = None,
) -> torch.Tensor:
    """Each document's loss, [B]: through the fused head when the model allows it, otherwise
    ``from_logits(logits)`` of the model's logits."""
    got = _head_input(model, lambda: model(input_ids=ids, use_cache=False).logits, target)
    if isinstance(got, torch.Tensor):
        return from_logits(got)
    return head_cross_entropy(got[0], got[1], target, reduction, sample)


def trained_head_losses(
    model: nn.Module,
    run: Callable[[], torch.Tensor],
    target: torch.Tensor,
    from_logits: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Every position's next-token cross-entropy, [B, T] (0 where ``target`` is the ignore
    index), of the model run by ``run()`` (which returns its logits, e.g. through
    ``torch.func.functional_call``), with the output head among what is differentiated, twice
    if need be (MAGIC's replay): through :class:`_TrainedHeadCrossEntropy` when the model allows
    it, otherwise ``from_logits(logits)``."""
    got = _head_input(model, run, target, trained=True)
    if isinstance(got, torch.Tensor):
        return from_logits(got)
    hidden, _, weight = got
    rows, targets, pos = _loss_rows(hidden, target)
    token = _TrainedHeadCrossEntropy.apply(rows, weight, targets)
    return token.new_zeros(target.numel()).index_add(0, pos, token).view(target.shape)
