"""The fused output-head loss against autograd through the full logits, and the route each
model family takes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bergson import collect_gradients
from bergson.collect import head_loss
from bergson.collect.head_loss import head_cross_entropy
from bergson.collect.losses import (
    document_batches,
    fisher_loss,
    label_sampler,
    next_tokens,
    per_document_loss,
    targets,
    token_losses,
)
from bergson.data import TokenizedDocs
from bergson.data.batching import IGNORE
from tests.helpers.families import FAMILIES, VOCAB, make_family
from tests.helpers.gradients import random_docs

SOFT_CAPPED = {"gemma2"}  # final logit soft-capping: the logits are not the head's output


def _reference(hidden, head, target, reduction):
    """Autograd through the whole [B, T, V] logits."""
    logits = head(hidden).float() if hidden.dtype == torch.bfloat16 else head(hidden)
    token = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE, reduction="none")
    total = token.view(target.shape).sum(1)
    if reduction == "mean":
        total = total / (target != IGNORE).sum(1).clamp(min=1)
    return total


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("chunk_bytes", [1 << 12, 1 << 24])  # many blocks of tokens, and one
def test_head_cross_entropy_equals_autograd_through_the_logits(monkeypatch, reduction, chunk_bytes):
    monkeypatch.setattr(head_loss, "CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    head = nn.Linear(8, 50, dtype=torch.float64).requires_grad_(False)
    target = torch.randint(0, 50, (3, 7))
    target[0, :2] = IGNORE  # a prompt
    target[1, 4:] = IGNORE  # padding
    target[2] = IGNORE  # a document without loss tokens
    upstream = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)  # document weights
    grads = []
    for fn in (head_cross_entropy, _reference):
        hidden = torch.randn(3, 7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        hidden.requires_grad_(True)
        losses = fn(hidden, head, target, reduction)
        (losses * upstream).sum().backward()
        grads.append((losses.detach(), hidden.grad))
    (ours, g_ours), (ref, g_ref) = grads
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)
    assert ours[2] == 0 and not g_ours[2].any() and not g_ours[1, 4:].any()


def test_head_cross_entropy_is_stable_for_logits_far_from_zero():
    """Float32 logits in the thousands (their exponentials overflow): losses and gradients
    still equal autograd through ``F.cross_entropy``, which shifts by the row maximum too."""
    torch.manual_seed(0)
    head = nn.Linear(8, 300).requires_grad_(False)
    head.weight.mul_(400.0)
    head.bias.fill_(-3000.0)
    target = torch.randint(0, 300, (2, 5))
    out = []
    for fn in (head_cross_entropy, _reference):
        hidden = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        losses = fn(hidden, head, target, "sum")
        losses.sum().backward()
        out.append((losses.detach(), hidden.grad))
    assert out[1][0].min() > 100 and torch.isfinite(out[0][0]).all()
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-5, atol=1e-3)


def test_head_cross_entropy_in_bfloat16_matches_the_upcast_reference():
    torch.manual_seed(0)
    head = nn.Linear(16, 300, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    target = torch.randint(0, 300, (2, 9))
    out = []
    for fn in (head_cross_entropy, _reference):
        hidden = (
            torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(1)).bfloat16().requires_grad_(True)
        )
        losses = fn(hidden, head, target, "sum")
        losses.sum().backward()
        assert losses.dtype == torch.float32 and hidden.grad.dtype == torch.bfloat16
        out.append((losses.detach(), hidden.grad.float()))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=0.02, atol=1e-3)  # bfloat16 rounding


def _trained_reference(hidden, weight, target):
    """Autograd through the logits ``hidden Wᵀ`` (the route of a model whose head is not fused)."""
    return F.cross_entropy(hidden @ weight.t(), target, reduction="none")


def _second_order(fn, frozen_head, seed=0):
    """Losses, the create_graph gradients at h and W of Σ a·CE, and the gradients of a random
    pairing of those with cotangents, at h, W and the token weights a (float64)."""
    gen = torch.Generator().manual_seed(seed)
    n, d, v = 11, 6, 40
    hidden = torch.randn(n, d, dtype=torch.float64, generator=gen).requires_grad_(True)
    weight = torch.randn(v, d, dtype=torch.float64, generator=gen).requires_grad_(not frozen_head)
    a = torch.randn(n, dtype=torch.float64, generator=gen).requires_grad_(True)
    target = torch.randint(0, v, (n,), generator=gen)
    losses = fn(hidden, weight, target)
    inputs = [hidden] if frozen_head else [hidden, weight]
    firsts = torch.autograd.grad((losses * a).sum(), inputs, create_graph=True)
    pairing = sum((g * torch.randn(g.shape, dtype=g.dtype, generator=gen)).sum() for g in firsts)
    seconds = torch.autograd.grad(pairing, [*inputs, a])
    return [losses.detach(), *(g.detach() for g in firsts), *seconds]


@pytest.mark.parametrize("frozen_head", [False, True])
def test_trained_head_second_order_equals_autograd_through_the_logits(frozen_head):
    """MAGIC's fused head: losses, gradients and their derivatives at h, W and the token weights."""
    ours = _second_order(head_loss._TrainedHeadCrossEntropy.apply, frozen_head)
    ref = _second_order(_trained_reference, frozen_head)
    assert len(ours) == (4 if frozen_head else 6)
    for x, y in zip(ours, ref):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_trained_head_passes_gradgradcheck():
    """Against finite differences of its own first and second derivatives (float64)."""
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(5, 3, dtype=torch.float64, generator=gen).requires_grad_(True)
    weight = torch.randn(7, 3, dtype=torch.float64, generator=gen).requires_grad_(True)
    target = torch.randint(0, 7, (5,), generator=gen)
    a = torch.randn(5, dtype=torch.float64, generator=gen).requires_grad_(True)

    def weighted(hidden, weight, a):
        return head_loss._TrainedHeadCrossEntropy.apply(hidden, weight, target) * a

    assert torch.autograd.gradcheck(weighted, (hidden, weight, a))
    assert torch.autograd.gradgradcheck(weighted, (hidden, weight, a))


def test_trained_head_is_stable_when_the_target_probability_underflows():
    """Float32 logits in the hundreds: the targets' softmax probabilities underflow to zero,
    and the losses still equal the log-sum-exp less the target logit, with finite gradients."""
    gen = torch.Generator().manual_seed(0)
    hidden = (30 * torch.randn(6, 8, generator=gen)).requires_grad_(True)
    weight = (10 * torch.randn(300, 8, generator=gen)).requires_grad_(True)
    target = (hidden.detach() @ weight.detach().t()).argmin(1)  # the least likely token
    target[0] = (hidden[0].detach() @ weight.detach().t()).argmax()  # and one likely one
    out = []
    for fn in (head_loss._TrainedHeadCrossEntropy.apply, _trained_reference):
        losses = fn(hidden, weight, target)
        out.append([losses.detach(), *torch.autograd.grad(losses.sum(), [hidden, weight])])
    assert out[1][0][1:].min() > 200 and all(torch.isfinite(x).all() for x in out[0])
    for x, y in zip(*out):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-3)


def _collect(model, docs, *, fused: bool, **kw):
    head_loss._PLAIN.pop(model, None)
    if not fused:
        head_loss._PLAIN[model] = False  # as if the first batch had failed the check
    sink = collect_gradients(model, docs, projection_dim=4, token_batch_size=24, progress=False, **kw)
    return sink, head_loss._PLAIN.get(model)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_gets_the_same_gradients_by_either_route(family):
    """Several batches, prompts, weights and the mean reduction: the fused route (where the
    family's logits are its head's output) equals the route through the logits."""
    model = make_family(family)
    docs = random_docs(9, VOCAB, seed=3)
    docs = TokenizedDocs(docs.input_ids, np.array([0, 2, 0, 4, 1, 0, 3, 0, 0]), weights=np.linspace(-1, 2, 9))
    for reduction in ("sum", "mean"):
        fused, route = _collect(model, docs, fused=True, loss_reduction=reduction)
        assert route is (family not in SOFT_CAPPED)
        plain, _ = _collect(model, docs, fused=False, loss_reduction=reduction)
        np.testing.assert_allclose(fused.vectors, plain.vectors, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(fused.loss, plain.loss, rtol=1e-6)


def test_a_tracked_head_takes_the_route_through_the_logits():
    model = make_family("llama")
    docs = random_docs(4, VOCAB, seed=1)
    modules = ["lm_head", "model.layers.0.mlp.down_proj"]
    head_loss._PLAIN.pop(model, None)
    sink = collect_gradients(model, docs, modules=modules, projection_dim=4, progress=False)
    assert model not in head_loss._PLAIN  # the hooked head was never replaced
    with torch.no_grad():
        for i, seq in enumerate(docs.input_ids):
            ids = torch.as_tensor(seq)[None]
            assert np.isclose(sink.loss[i], per_document_loss(model(ids).logits, ids).item(), rtol=1e-6)


def test_the_stand_in_must_come_back_untouched():
    """A model that starts post-processing its logits after the first batch is a bug to report,
    not a silently wrong loss."""
    model = make_family("gpt_neox")
    docs = random_docs(2, VOCAB, seed=2)
    head_loss._PLAIN[model] = True
    inner = model.forward

    def scaled(*args, **kwargs):
        out = inner(*args, **kwargs)
        out.logits = out.logits * 2
        return out

    model.forward = scaled
    with pytest.raises(RuntimeError, match="changed its logits"):
        collect_gradients(model, docs, projection_dim=4, progress=False)


@pytest.mark.parametrize(
    "chunk_bytes", [1 << 11, 1 << 24]
)  # blocks of whole documents (one too long), one block
def test_true_fisher_labels_are_the_same_draws_by_either_route(monkeypatch, chunk_bytes):
    """The true Fisher's targets are drawn per document from its own logits: the fused route
    draws exactly the labels (hence losses and gradients) of the route through the logits."""
    monkeypatch.setattr(head_loss, "CHUNK_BYTES", chunk_bytes)  # 2 KiB: blocks of the 16-row floor
    torch.manual_seed(0)
    head = nn.Linear(8, 50, dtype=torch.float64).requires_grad_(False)
    labels = torch.randint(0, 50, (4, 24))  # documents of 23, 20, 5 and 23 loss tokens
    labels[0, :3] = IGNORE
    labels[2, 5:] = IGNORE
    rows = np.array([7, 3, 11, 5])
    sample = label_sampler(rows, seed=4)
    out = []
    for route in ("fused", "logits"):
        hidden = torch.randn(4, 24, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        hidden.requires_grad_(True)
        if route == "fused":
            losses = head_cross_entropy(hidden, head, next_tokens(labels), "sum", sample)
        else:
            logits = head(hidden)
            losses = token_losses(logits, targets(logits, labels, rows, "true", seed=4)).sum(1)
        losses.sum().backward()
        out.append((losses.detach(), hidden.grad))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-12, atol=1e-12)
    # and the draws are the model's: a different seed gives other labels
    other = head_cross_entropy(hidden.detach(), head, next_tokens(labels), "sum", label_sampler(rows, seed=5))
    assert not torch.allclose(other, out[0][0])


def test_fisher_losses_of_a_model_agree_by_either_route():
    model = make_family("qwen2")
    docs = random_docs(5, VOCAB, seed=6)
    batch = next(document_batches(docs, [np.arange(5)], 0, torch.device("cpu")))
    for fisher in ("true", "empirical"):
        got = []
        for fused in (True, False):
            head_loss._PLAIN[model] = fused
            with torch.no_grad():
                got.append(fisher_loss(fisher, seed=2)(model, batch))
        torch.testing.assert_close(got[0], got[1], rtol=1e-10, atol=1e-10)
