"""The Hugging Face Trainer callback: its stored vectors are those `bergson build` makes for the
same rows at the weights and optimizer state of the step that trained on them; its order file
is what the model was actually fed; its epoch stores are ordinary stores; bad set-ups fail."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from bergson import BergsonError, GradientCollectorCallback, prepare_for_gradient_collection
from bergson.config import ScoreConfig
from bergson.models import find_tracked_modules
from bergson.scoring import score
from bergson.search.attributor import Attributor
from bergson.store import load_gradients
from bergson.transforms.normalizers import NORMALIZERS_FILE, load_normalizers
from bergson.transforms.optimizer_state import normalizers_from_optimizer_state
from tests.helpers.trainer import (
    ACCUM,
    BATCH,
    EPOCHS,
    MODEL,
    ROWS,
    _build,
    _Capture,
    _close,
    _token_ids,
    _trainer,
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One training run (2 epochs, 2 steps each) with the callback and a capturing callback."""
    tmp = tmp_path_factory.mktemp("callback")
    ids = _token_ids()
    capture = _Capture({0, 1, 3}, ids)
    callback = GradientCollectorCallback(tmp / "grads", save_dtype="float32")
    trainer = _trainer(tmp, [callback, capture.callback])
    # the original package's README: trainer = prepare_for_gradient_collection(trainer); trainer.train()
    assert prepare_for_gradient_collection(trainer) is trainer
    assert GradientCollectorCallback.of(trainer) is callback
    trainer.train()
    return {"tmp": tmp, "ids": ids, "capture": capture, "callback": callback, "trainer": trainer}


def _order(callback: GradientCollectorCallback):
    import pandas as pd

    return pd.concat([pq.read_table(s / "order.parquet").to_pandas() for s in callback.stores])


# ---------------------------------------------------------------------------------------------
# 1. vectors equal `bergson build` at the step's weights and optimizer state


@pytest.mark.parametrize("step", [0, 1, 3])
def test_step_vectors_equal_build(run, step):
    tmp, ids, callback = run["tmp"], run["ids"], run["callback"]
    order = _order(callback)
    at_step = order[order.step == step]
    rows = at_step.row.tolist()
    assert len(rows) == BATCH * ACCUM
    epoch = int(at_step.epoch.iloc[0])
    store = load_gradients(callback.stores[epoch])

    weights, opt_state = run["capture"].saved[step]
    normalizers = None
    if step > 0:  # the optimizer's state as a checkpoint's optimizer.pt, read the `bergson build` way
        path = tmp / f"optimizer-{step}.pt"
        torch.save(opt_state, path)
        model: Any = run["trainer"].model
        normalizers = normalizers_from_optimizer_state(
            path, model, find_tracked_modules(model), form="rank_one"
        )
    assert bool(at_step.normalized.all()) == (step > 0)
    built = _build(tmp, f"build-{step}", weights, rows, normalizers, ids)

    _close(np.asarray(store.all[rows]), np.asarray(built.all[:]))
    np.testing.assert_allclose(store.rows["loss"][rows], built.rows["loss"], rtol=1e-4)
    np.testing.assert_array_equal(store.rows["num_tokens"][rows], built.rows["num_tokens"])
    assert store.manifest.plan["unnormalized_steps"] == ([0] if epoch == 0 else [])


def test_gradient_checkpointing_gives_the_same_stores(run, tmp_path):
    """The same training run with (reentrant) gradient checkpointing: layers rerun during
    backward, and the stores equal those of the run without it. TRL's test covers the
    non-reentrant form, the transformers default."""
    callback = GradientCollectorCallback(tmp_path / "grads", save_dtype="float32")
    trainer = _trainer(
        tmp_path,
        [callback],
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": True},
    )
    prepare_for_gradient_collection(trainer).train()
    assert trainer.model.is_gradient_checkpointing
    for ours, theirs in zip(callback.stores, run["callback"].stores, strict=True):
        a, b = load_gradients(ours), load_gradients(theirs)
        _close(np.asarray(a.all[:]), np.asarray(b.all[:]), rtol=1e-5)
        np.testing.assert_allclose(a.rows["loss"], b.rows["loss"], rtol=1e-6)


def test_adam_form_with_per_batch_mean_loss(tmp_path):
    """The elementwise normalizer, and a trainer that scales its loss another way (the mean over
    each micro-batch's tokens, divided by the accumulation steps): c is measured, not assumed."""
    ids = _token_ids()
    capture = _Capture({1}, ids)
    callback = GradientCollectorCallback(tmp_path / "grads", save_dtype="float32", normalizer_form="adam")
    trainer = _trainer(tmp_path, [callback, capture.callback], num_train_epochs=1)
    trainer.model_accepts_loss_kwargs = False
    prepare_for_gradient_collection(trainer)
    trainer.train()

    order = _order(callback)
    rows = order[order.step == 1].row.tolist()
    weights, opt_state = capture.saved[1]
    torch.save(opt_state, tmp_path / "optimizer.pt")
    model: Any = trainer.model
    normalizers = normalizers_from_optimizer_state(tmp_path, model, find_tracked_modules(model), form="adam")
    built = _build(tmp_path, "build", weights, rows, normalizers, ids)
    _close(np.asarray(load_gradients(callback.stores[0]).all[rows]), np.asarray(built.all[:]))


def test_loss_scale_probe_recovers_row_weights():
    """c is measured per row from the gradient at the logits (rows may carry different weights),
    and per-row losses are recovered from that gradient without a pass over the vocabulary."""
    import torch.nn.functional as F

    from bergson.collect.losses import next_tokens
    from bergson.integrations.loss_scale import MicroBatch

    torch.manual_seed(0)
    batch, length, vocab = 4, 24, 512
    logits = torch.randn(batch, length, vocab) * 3
    ids = torch.randint(0, vocab, (batch, length))
    labels = ids.clone()
    labels[1, :10] = -100
    labels[3] = -100  # a row without labels
    weights = torch.tensor([1 / 50, 1 / 7, 3.0, 1.0], dtype=torch.float64)
    targets = next_tokens(labels)
    mask = targets != -100
    dz = F.softmax(logits.double(), -1)
    dz[torch.arange(batch)[:, None], torch.arange(length)[None, :], targets.clamp(min=0)] -= 1
    grad = (dz * mask[..., None] * weights[:, None, None]).float()
    ce = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1), reduction="none")

    mb = MicroBatch(np.arange(batch), 0, 0, True, torch.zeros(batch, 1), targets, np.zeros(batch), ids)
    mb.probe_forward(logits)
    mb.probe_backward(grad)
    assert mb.scale is not None and mb.residual is not None and mb.loss is not None
    np.testing.assert_allclose(mb.scale[:3].numpy(), weights[:3].numpy(), rtol=1e-6)
    assert float(mb.scale[3]) == 0 and float(mb.residual.max()) < 1e-5
    np.testing.assert_allclose(mb.loss.numpy(), ce.view(batch, length).sum(1).double().numpy(), rtol=1e-5)
    assert mb.approximate == 0


# ---------------------------------------------------------------------------------------------
# 2. the order file is the order the model was fed


def test_order_matches_training_batches(run):
    callback, fed = run["callback"], run["capture"].fed
    order = _order(callback)
    assert order.row.tolist() == [r for batch in fed for r in batch]
    micro = np.repeat(np.arange(len(fed)), BATCH)
    np.testing.assert_array_equal(order.step, micro // ACCUM)
    np.testing.assert_array_equal(order.micro_batch, micro % ACCUM)
    np.testing.assert_array_equal(order.epoch, micro // (ROWS // BATCH))
    for epoch in range(EPOCHS):
        assert sorted(order[order.epoch == epoch].row) == list(range(ROWS))
    assert order[order.epoch == 0].row.tolist() != order[order.epoch == 1].row.tolist()  # shuffled per epoch


def test_order_with_workers_and_dropped_rows(tmp_path):
    """Worker processes prefetch batches; drop_last leaves rows untrained (zero, num_tokens 0)."""
    ids = _token_ids(18)
    capture = _Capture(set(), ids)
    callback = GradientCollectorCallback(tmp_path / "grads", modules=["*"])  # the output head too
    trainer = _trainer(
        tmp_path,
        [callback, capture.callback],
        num_rows=18,
        num_train_epochs=1,
        gradient_accumulation_steps=1,
        dataloader_num_workers=2,
        dataloader_drop_last=True,
    )
    prepare_for_gradient_collection(trainer)
    trainer.train()
    order = _order(callback)
    assert order.row.tolist() == [r for batch in capture.fed for r in batch]
    store = load_gradients(callback.stores[0])
    # save_dtype "auto": normalized by the first step's tiny second moments, some values of the
    # output head exceed float16's range, so the store falls back to float32 instead of failing the run
    assert len(store) == 18 and store.manifest.dtype == "float32"
    dropped = sorted(set(range(18)) - set(order.row))
    assert len(dropped) == 2 and store.manifest.plan["rows_not_trained"] == 2
    assert not np.asarray(store.all[dropped]).any()
    assert (store.rows["num_tokens"][dropped] == 0).all()
    assert np.abs(np.asarray(store.all[order.row.tolist()])).sum(1).min() > 0


# ---------------------------------------------------------------------------------------------
# 3. an epoch store is an ordinary store: score --index and query work on it


def test_epoch_store_scores_and_queries(run):
    tmp, ids, callback, trainer = run["tmp"], run["ids"], run["callback"], run["trainer"]
    index = callback.stores[1]
    store = load_gradients(index)
    assert len(store) == ROWS and (store.rows["row_id"] == np.arange(ROWS)).all()
    assert store.manifest.kind == "gradients" and store.manifest.model["name"] == MODEL
    assert (index / NORMALIZERS_FILE).is_file() and store.manifest.normalizer is not None

    # a query store built the `bergson build` way, with the store's own normalizers
    query = _build(
        tmp, "query", trainer.model.state_dict(), [0, 5], load_normalizers(index / NORMALIZERS_FILE), ids
    )
    out = score(ScoreConfig(run_path=str(tmp / "scores"), query_path=str(query.root), index=str(index)))
    expected = np.asarray(store.all[:], np.float64) @ np.asarray(query.all[:], np.float64).T
    _close(np.asarray(out.all[:], np.float64), expected, rtol=1e-3)

    # the Attributor behind `bergson query`
    _, idx = Attributor(index).search(np.asarray(query.all[:]), 3)
    np.testing.assert_array_equal(idx.numpy(), np.argsort(-expected, axis=0)[:3].T)


# ---------------------------------------------------------------------------------------------
# 4. set-ups the callback cannot support fail with a message naming the cause


def test_bad_setups_raise(tmp_path, monkeypatch):
    from transformers import DataCollatorWithFlattening

    callback = GradientCollectorCallback(tmp_path / "a")
    with pytest.raises(BergsonError, match="label smoothing"):
        prepare_for_gradient_collection(_trainer(tmp_path, [callback], label_smoothing_factor=0.1))
    with pytest.raises(BergsonError, match="packed"):
        prepare_for_gradient_collection(
            _trainer(tmp_path, [callback], data_collator=DataCollatorWithFlattening())
        )
    with pytest.raises(BergsonError, match="no GradientCollectorCallback"):
        prepare_for_gradient_collection(_trainer(tmp_path, []))
    with pytest.raises(BergsonError, match="normalizer_form"):
        GradientCollectorCallback(tmp_path / "b", normalizer_form="diagonal")

    trainer = _trainer(tmp_path, [GradientCollectorCallback(tmp_path / "c")], max_steps=1)
    with pytest.raises(BergsonError, match="prepare_for_gradient_collection"):
        trainer.train()

    trainer = _trainer(tmp_path, [GradientCollectorCallback(tmp_path / "d")], max_steps=1)
    monkeypatch.setattr(type(trainer.args), "world_size", property(lambda self: 2))
    with pytest.raises(
        BergsonError, match=r"runs 2 processes but this process's torch\.distributed group has 1"
    ):
        prepare_for_gradient_collection(trainer)
    monkeypatch.setattr(type(trainer.args), "world_size", property(lambda self: 1))
    monkeypatch.setattr(type(trainer.args), "n_gpu", property(lambda self: 2))
    with pytest.raises(BergsonError, match="DataParallel"):
        prepare_for_gradient_collection(trainer)


def test_loss_with_other_terms_is_refused(tmp_path):
    """A loss that is not a multiple of the labels' cross-entropy is caught by the c measurement."""
    from transformers import Trainer

    class ZLossTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(**inputs)
            return out.loss + 1e-2 * out.logits.logsumexp(-1).pow(2).mean()

    callback = GradientCollectorCallback(tmp_path / "grads")
    trainer = _trainer(tmp_path, [callback], trainer_cls=ZLossTrainer, max_steps=1)
    prepare_for_gradient_collection(trainer)
    with pytest.raises(BergsonError, match="not a multiple"):
        trainer.train()


def test_tracked_module_without_gradient_is_an_error(tmp_path):
    """A tracked layer whose forward never runs would keep zero columns: refused by name."""
    callback = GradientCollectorCallback(tmp_path / "grads", modules=["gpt_neox.layers.0.mlp.*", "spare"])
    trainer = _trainer(tmp_path, [callback], max_steps=1)
    trainer.model.add_module("spare", torch.nn.Linear(4, 4))  # never called by forward
    prepare_for_gradient_collection(trainer)
    with pytest.raises(BergsonError, match=r"no gradient reached the tracked module\(s\) spare"):
        trainer.train()


def test_existing_stores_need_overwrite(run):
    callback = GradientCollectorCallback(run["callback"].path)
    trainer = _trainer(run["tmp"] / "again", [callback], max_steps=1)
    prepare_for_gradient_collection(trainer)
    with pytest.raises(BergsonError, match="overwrite=True"):
        trainer.train()


def test_a_skipped_overflow_step_is_stored_as_zeros_and_listed(tmp_path):
    """Rows whose gradients were not finite (a half-precision loss-scaler overflow: the trainer skips
    that step) reach the epoch store as NaN and are written as zeros, listed in the manifest."""
    from dataclasses import replace

    from bergson.integrations.epoch_store import EpochStore
    from tests.helpers.stores import synthetic_store

    base = synthetic_store(tmp_path / "base", np.ones((4, 3)), dtype="float32").manifest
    manifest = replace(base, status="in_progress", shards=[], nonfinite=None, norms=None)
    epoch = EpochStore(tmp_path / "epoch", manifest, num_rows=4, epoch=0, shard_size=4, auto_dtype=True)
    vectors = np.arange(12, dtype=np.float64).reshape(4, 3) + 1
    vectors[2] = np.nan
    epoch.add(np.arange(4), vectors, np.full(4, 5), np.ones(4, np.float32), 0, 0, False)
    epoch.close({}, None, None, write_order=False)
    store = load_gradients(tmp_path / "epoch")
    assert store.manifest.nonfinite is not None and store.manifest.nonfinite["row_ids"] == [2]
    got = np.asarray(store.all)
    np.testing.assert_array_equal(got[2], 0.0)
    np.testing.assert_array_equal(got[[0, 1, 3]], vectors[[0, 1, 3]])
