"""TRL's SFTTrainer with the callback, the original package's README way
(``trainer = prepare_for_gradient_collection(trainer); trainer.train()``), on its default
SFTConfig: gradient checkpointing on, and its fused LM head, which computes the loss from the
output layer's weight without calling the layer. The stored rows must be the gradients of each
row's summed completion-token cross-entropy at the weights of the step that trained on it."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from bergson import BergsonError, GradientCollectorCallback, prepare_for_gradient_collection
from bergson.collect.losses import per_document_loss
from bergson.store import load_gradients
from tests.helpers.assets import ASSETS
from tests.helpers.trainer import MODEL, _Capture

trl = pytest.importorskip("trl")

ROWS, BATCH, ACCUM = 8, 2, 2
BODY = ["gpt_neox.*"]
"""The layers inside model.base_model: TRL's fused LM head never calls the output layer."""


def _dataset():
    """Prompt/completion pairs from the shipped corpus (prompts end on a word boundary)."""
    from datasets import Dataset

    with gzip.open(ASSETS / "corpus.jsonl.gz", "rt") as f:
        words = [json.loads(next(f))["text"].split() for _ in range(ROWS)]
    return Dataset.from_dict(
        {
            "prompt": [" ".join(w[:6]) for w in words],
            "completion": [" " + " ".join(w[6 : 6 + 4 + 2 * i]) for i, w in enumerate(words)],
        }
    )


def _sft(tmp: Path, callback: GradientCollectorCallback, **overrides: Any):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options: dict[str, Any] = {
        "output_dir": str(tmp / "run"),
        "per_device_train_batch_size": BATCH,
        "gradient_accumulation_steps": ACCUM,
        "num_train_epochs": 1,
        "learning_rate": 1e-2,  # large enough that each step's weights differ visibly
        "bf16": False,  # SFTConfig's default; exact float32 comparisons need float32
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
        **overrides,
    }
    tok = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL)
    return trl.SFTTrainer(
        model=model,
        args=trl.SFTConfig(**options),
        train_dataset=_dataset(),
        processing_class=tok,
        callbacks=[callback],
    )


def _train(tmp: Path, **overrides: Any) -> dict[str, Any]:
    callback = GradientCollectorCallback(
        tmp / "grads", projection_dim=0, normalize=False, save_dtype="float32"
    )
    trainer = _sft(tmp, callback, **overrides)
    capture = _Capture({0, 1}, [list(r) for r in trainer.train_dataset["input_ids"]])
    trainer.add_callback(capture.callback)
    # the original package's README
    trainer = prepare_for_gradient_collection(trainer)
    trainer.train()
    return {"trainer": trainer, "callback": callback, "capture": capture}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same SFT run with SFTConfig's default gradient checkpointing and without it."""
    return {
        gc: _train(tmp_path_factory.mktemp(f"trl-{gc}"), gradient_checkpointing=gc) for gc in (True, False)
    }


def _naive(state: dict[str, torch.Tensor], names: list[str]):
    """Per-row gradients at the given weights, one plain forward (the model's own logits) and
    one backward of the row's summed next-token cross-entropy each, in the store's
    full-gradient layout, with the row's loss."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODEL)
    model.load_state_dict(state)
    modules = dict(model.named_modules())

    def row(ids: list[int], labels: list[int]) -> tuple[np.ndarray, float]:
        model.zero_grad()
        loss = per_document_loss(model(torch.tensor([ids])).logits, torch.tensor([labels])).sum()
        loss.backward()
        grads = [modules[n].weight.grad.flatten() for n in names]  # type: ignore[union-attr]
        return torch.cat(grads).numpy(), float(loss.detach())

    return row


def test_default_sft_config_checkpoints_and_fuses_the_head(runs):
    trainer = runs[True]["trainer"]
    assert trainer.args.gradient_checkpointing and trainer.model.is_gradient_checkpointing
    assert trainer.completion_only_loss  # prompt/completion rows: loss on the completion only
    labels = np.asarray(trainer.train_dataset[0]["labels"])
    assert (labels[:3] == -100).all() and (labels[-3:] != -100).all()


@pytest.mark.parametrize("checkpointing", [True, False])
def test_rows_equal_naive_per_row_gradients(runs, checkpointing):
    run = runs[checkpointing]
    trainer, callback, capture = run["trainer"], run["callback"], run["capture"]
    data = trainer.train_dataset
    store = load_gradients(callback.stores[0])
    names = [m.name for m in store.manifest.modules]
    assert names and all(n.startswith("gpt_neox.") for n in names)
    order = pq.read_table(callback.stores[0] / "order.parquet").to_pandas()
    assert sorted(order.row) == list(range(len(data)))
    assert order.row.tolist() == [r for batch in capture.fed for r in batch]
    vectors = np.asarray(store.all[:])
    naive = {step: _naive(capture.saved[step][0], names) for step in (0, 1)}
    for step in (0, 1):
        for row in order[order.step == step].row:
            want, loss = naive[step](data[row]["input_ids"], data[row]["labels"])
            np.testing.assert_allclose(vectors[row], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
            np.testing.assert_allclose(store.rows["loss"][row], loss, rtol=1e-5)
    # the step-1 rows are not the gradients at the step-0 weights (the comparison sees the weights)
    row = int(order[order.step == 1].row.iloc[0])
    stale, _ = naive[0](data[row]["input_ids"], data[row]["labels"])
    assert np.abs(vectors[row] - stale).max() > 1e-2 * np.abs(stale).max()


def test_checkpointing_changes_nothing(runs):
    on, off = (load_gradients(runs[gc]["callback"].stores[0]) for gc in (True, False))
    np.testing.assert_allclose(np.asarray(on.all[:]), np.asarray(off.all[:]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(on.rows["loss"], off.rows["loss"], rtol=1e-6)


def test_tracked_output_layer_under_fused_head_is_an_error(tmp_path):
    """Tracking the output layer, which TRL's fused LM head never calls, fails on the first
    micro-batch instead of storing zero columns for it."""
    for callback in (
        GradientCollectorCallback(tmp_path / "grads", modules=["gpt_neox.layers.0.*", "lm_head"]),
        GradientCollectorCallback(tmp_path / "grads2", include_output_head=True),
    ):
        trainer = prepare_for_gradient_collection(_sft(tmp_path, callback, max_steps=1))
        with pytest.raises(
            BergsonError, match=r"fused LM head.*'lm_head'.*include_output_head.*modules=\['gpt_neox\.\*'\]"
        ):
            trainer.train()


def test_losses_other_than_nll_are_refused(tmp_path):
    callback = GradientCollectorCallback(tmp_path / "grads", modules=BODY)
    with pytest.raises(BergsonError, match="loss_type='dft'"):
        prepare_for_gradient_collection(_sft(tmp_path, callback, loss_type="dft"))
