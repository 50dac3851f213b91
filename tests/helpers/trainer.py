"""The callback tests' training run: a Hugging Face Trainer on the shipped tiny model, a callback
that records what it was fed, and the `bergson build` its vectors must equal (shared with the
data-parallel run in ``ddp_trainer.py``)."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bergson.config import IndexConfig
from bergson.data import TokenizedDocs
from bergson.runs.shared_store import write_store
from tests.helpers.assets import ASSETS

MODEL = str(ASSETS / "tiny-pythia")
ROWS, TOKENS, BATCH, ACCUM, EPOCHS = 16, 32, 4, 2, 2


def _token_ids(num_rows: int = ROWS) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL)
    with gzip.open(ASSETS / "corpus.jsonl.gz", "rt") as f:
        texts = [json.loads(next(f))["text"] for _ in range(num_rows)]
    return [tok(t)["input_ids"][:TOKENS] for t in texts]


def _trainer(
    tmp_path: Path, callbacks: list[Any], num_rows: int = ROWS, trainer_cls: Any = None, **overrides
):
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    tok = AutoTokenizer.from_pretrained(MODEL)
    options: dict[str, Any] = {
        "output_dir": str(tmp_path / "run"),
        "per_device_train_batch_size": BATCH,
        "gradient_accumulation_steps": ACCUM,
        "num_train_epochs": EPOCHS,
        "learning_rate": 1e-3,
        "optim": "adamw_torch",
        "report_to": "none",
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "seed": 0,
        "logging_strategy": "no",
        "save_strategy": "no",
        "disable_tqdm": True,
        **overrides,
    }
    collator = options.pop("data_collator", None) or DataCollatorForLanguageModeling(tok, mlm=False)
    model = options.pop("model", None) or AutoModelForCausalLM.from_pretrained(MODEL)
    dataset = Dataset.from_dict({"input_ids": _token_ids(num_rows)})
    cls = trainer_cls or Trainer
    return cls(
        model=model,
        args=TrainingArguments(**options),
        train_dataset=dataset,
        data_collator=collator,
        callbacks=callbacks,
    )


class _Capture:
    """Test-only: the weights and optimizer state at the start of chosen steps, and the rows of
    every training batch the model was fed (matched to dataset rows by their tokens)."""

    def __init__(self, steps: set[int], ids: list[list[int]]):
        from transformers import TrainerCallback

        self.steps = steps
        self.saved: dict[int, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}
        self.fed: list[list[int]] = []
        self.by_tokens = {tuple(seq): i for i, seq in enumerate(ids)}
        capture = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, model: Any = None, **kwargs):
                model.register_forward_pre_hook(capture.record, with_kwargs=True)

            def on_step_begin(self, args, state, control, model: Any = None, optimizer: Any = None, **kwargs):
                if state.global_step in capture.steps:
                    capture.saved[state.global_step] = (
                        copy.deepcopy(model.state_dict()),
                        copy.deepcopy(optimizer.state_dict()),
                    )

        self.callback = Callback()

    def record(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
            self.fed.append([self.by_tokens[tuple(r[m.bool()].tolist())] for r, m in zip(ids, mask)])


def _build(tmp_path: Path, name: str, state: dict[str, torch.Tensor], rows: list[int], normalizers, ids):
    """`bergson build` of some dataset rows with the given weights (float32 vectors)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODEL)
    model.load_state_dict(state)
    docs = TokenizedDocs([np.asarray(ids[r], np.int64) for r in rows], np.zeros(len(rows), np.int64))
    cfg = IndexConfig(run_path=str(tmp_path / name), model=MODEL, projection_dim=16, save_dtype="float32")
    return write_store(cfg, model, docs, 2048, 0, normalizers)


def _close(ours: np.ndarray, expected: np.ndarray, rtol: float = 1e-4) -> None:
    np.testing.assert_allclose(ours, expected, rtol=rtol, atol=rtol * float(np.abs(expected).max()))
