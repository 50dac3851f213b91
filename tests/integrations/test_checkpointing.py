"""Gradient (activation) checkpointing reruns layers during backward; the hooks must still
give every row the gradient of its own forward pass: equal to a naive per-row autograd loop,
with the non-reentrant checkpoint (the transformers default) and the reentrant one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bergson.collect.hooks import GradientCollector, LayerTap
from bergson.collect.losses import per_document_loss
from bergson.models import find_tracked_modules
from tests.helpers.assets import tiny_neox
from tests.helpers.gradients import naive_gradients, random_docs

VOCAB = 48


def _padded(docs):
    """A right-padded batch of the documents, labels -100 on padding."""
    length = max(len(s) for s in docs.input_ids)
    ids = torch.zeros(len(docs.input_ids), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(docs.input_ids):
        ids[i, : len(seq)] = torch.as_tensor(seq)
        mask[i, : len(seq)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _model(checkpointing: str | None):
    model = tiny_neox(vocab=VOCAB, layers=3).train()  # checkpointing is active in training mode only
    if checkpointing is not None:
        model.gradient_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})
    return model


@pytest.mark.parametrize("checkpointing", [None, "non_reentrant", "reentrant"])
@pytest.mark.parametrize("projection_dim", [0, 4])
def test_per_example_gradients_under_checkpointing(checkpointing, projection_dim):
    docs = random_docs(5, VOCAB, seed=3)
    ids, mask, labels = _padded(docs)

    reference = _model(None)
    modules = find_tracked_modules(reference)
    naive = naive_gradients(reference, docs, modules, include_bias=False)

    model = _model(checkpointing)
    tracked = find_tracked_modules(model)
    with GradientCollector(model, tracked, projection_dim=projection_dim) as collector:
        for _ in range(2):  # a second batch: nothing of the first one's recomputation is left over
            collector.reset()
            model.zero_grad()
            out = model(input_ids=ids, attention_mask=mask)
            per_document_loss(out.logits, labels).sum().backward()
    got = collector.gradients
    for name in modules:
        want = torch.stack([w for w, _ in naive[name]])  # [N, out, in]
        if projection_dim:
            want = torch.stack([collector.per_example(name, x, g) for x, g in _factors(want)]).squeeze(1)
        np.testing.assert_allclose(
            got[name].reshape(len(want), -1).numpy(),
            want.reshape(len(want), -1).numpy(),
            rtol=1e-7,
            atol=1e-10,
        )


def _factors(grads: torch.Tensor):
    """Each row's gradient G written as a sum of x/g outer products (the identity's columns as
    inputs), so that the collector's own projection of it can be compared."""
    n_in = grads.shape[-1]
    eye = torch.eye(n_in, dtype=grads.dtype)
    return [(eye[None], g.T[None]) for g in grads]


@pytest.mark.parametrize("checkpointing", ["non_reentrant", "reentrant"])
def test_layer_tap_under_checkpointing(checkpointing):
    """The statistics hooks (EK-FAC) see each layer's x and g once per backward, of the right
    forward: their per-row products g^T x are the naive per-row gradients."""
    docs = random_docs(4, VOCAB, seed=4)
    ids, mask, labels = _padded(docs)
    reference = _model(None)
    naive = naive_gradients(reference, docs, find_tracked_modules(reference), include_bias=False)
    model = _model(checkpointing)
    got: dict[str, list[torch.Tensor]] = {}

    def tap(name: str, x: torch.Tensor, g: torch.Tensor) -> None:
        got.setdefault(name, []).append(g.mT @ x)

    with LayerTap(find_tracked_modules(model), tap):
        out = model(input_ids=ids, attention_mask=mask)
        per_document_loss(out.logits, labels).sum().backward()
    assert got.keys() == naive.keys()
    for name, grads in got.items():
        assert len(grads) == 1
        want = torch.stack([w for w, _ in naive[name]])
        np.testing.assert_allclose(grads[0].numpy(), want.numpy(), rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("checkpointing", ["non_reentrant", "reentrant"])
def test_recomputation_projects_once_and_keeps_nothing(checkpointing):
    """Each layer input is projected once per micro-batch (not again when a checkpoint reruns the
    layer) and nothing of a micro-batch is held once its backward pass is over."""
    import gc
    import weakref

    docs = random_docs(3, VOCAB, seed=5)
    ids, mask, labels = _padded(docs)
    model = _model(checkpointing)
    tracked = find_tracked_modules(model)
    projected: list[weakref.ref] = []
    with GradientCollector(model, tracked, projection_dim=4, closure=lambda n, v: None) as collector:
        project = collector.project_inputs

        def counting(block, x):
            out = project(block, x)
            projected.append(weakref.ref(out))
            return out

        collector.project_inputs = counting  # type: ignore[method-assign]
        for _ in range(2):
            out = model(input_ids=ids, attention_mask=mask)
            per_document_loss(out.logits, labels).sum().backward()
            del out
        gc.collect()
        assert len(projected) == 2 * len(tracked)
        assert all(ref() is None for ref in projected)
