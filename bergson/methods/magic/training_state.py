"""A MAGIC run's training state as the files other tools read: a Hugging Face model directory
with the optimizer's state dict (``optimizer.pt``, the format ``--optimizer_state`` reads), and
a ``trainer/`` directory in the Hugging Face Trainer's layout (``trainer_state.json`` with one
``log_history`` entry per optimizer step, and ``checkpoint-<step>/`` model directories).

Step numbers follow the Trainer's ``global_step``: checkpoint ``k`` holds the state after k
optimizer updates, and the log entry of step k holds the learning rate and mean loss of the
k-th update (:func:`.recipe.learning_rate` at 0-based step k - 1).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...config import TrainingConfig
from ...core.files import atomic_write_bytes
from ...errors import BergsonError
from .recipe import State, learning_rate

logger = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.pt"
"""The torch optimizer state dict next to the weights (the name a Trainer checkpoint uses)."""
OPTIMIZER_INFO = "optimizer.json"
"""What ``optimizer.pt`` holds and whether ``--optimizer_state`` can use it."""
TRAINER_DIR = "trainer"
TRAINER_STATE = "trainer_state.json"


def checkpoint_steps_to_save(count: int, total: int) -> list[int]:
    """``count`` evenly spaced steps in 1..``total`` (the last is ``total``); 0 gives none."""
    if count == 0:
        return []
    if not 0 < count <= total:
        raise BergsonError(
            f"--save_checkpoints {count}: the recipe trains {total} optimizer steps; give at most {total} "
            "(or 0 for none)"
        )
    return sorted({math.ceil(total * i / count) for i in range(1, count + 1)})


def optimizer_state_dict(recipe: TrainingConfig, state: State, step: int) -> dict[str, Any]:
    """``torch.optim.AdamW`` or ``SGD``'s ``state_dict()`` after ``step`` updates from ``state``,
    one param group (MAGIC applies one learning rate and weight decay to every trained
    parameter) with the parameters' names, so ``--optimizer_state`` maps them without guessing."""
    names = list(state.params)
    group: dict[str, Any] = {
        "params": list(range(len(names))),
        "param_names": names,
        "lr": recipe.lr,
        "initial_lr": recipe.lr,
        "weight_decay": recipe.weight_decay,
        "maximize": False,
    }
    per_param: dict[int, dict[str, Any]]
    if recipe.optimizer == "adamw":
        group.update(betas=(recipe.beta1, recipe.beta2), eps=recipe.eps, amsgrad=False)
        if recipe.eps_root:
            group["eps_root"] = recipe.eps_root  # not torch's: AdamW there has no eps_root
        per_param = {
            i: {
                "step": torch.tensor(float(step)),
                "exp_avg": state.slots["m"][k].detach().cpu().clone(),
                "exp_avg_sq": state.slots["v"][k].detach().cpu().clone(),
            }
            for i, k in enumerate(names)
        }
    else:
        group.update(momentum=recipe.momentum, dampening=0.0, nesterov=False)
        # torch keeps no buffer without momentum (the update is the gradient itself)
        per_param = (
            {
                i: {"momentum_buffer": state.slots["buf"][k].detach().cpu().clone()}
                for i, k in enumerate(names)
            }
            if recipe.momentum
            else {}
        )
    return {"state": per_param, "param_groups": [group]}


def optimizer_info(recipe: TrainingConfig, step: int) -> dict[str, Any]:
    """The description written next to ``optimizer.pt`` (also logged for SGD)."""
    info: dict[str, Any] = {"optimizer": recipe.optimizer, "step": step, "file": OPTIMIZER_FILE}
    if recipe.optimizer == "adamw":
        info["second_moments"] = True
        info["optimizer_state"] = (
            "usable: --optimizer_state divides gradients by sqrt(exp_avg_sq / (1 - beta2^step))"
        )
        if recipe.eps_root:
            info["note"] = (
                f"the recipe's eps_root {recipe.eps_root} (inside the square root) has no torch AdamW "
                "counterpart; the normalizers read eps only"
            )
    else:
        info["second_moments"] = False
        info["optimizer_state"] = (
            "not usable: SGD keeps no second moments (only "
            + ("momentum buffers" if recipe.momentum else "nothing, momentum 0")
            + "), so --optimizer_state has nothing to divide gradients by"
        )
    return info


def save_training_state(
    model: nn.Module, tokenizer: Any, state: State, recipe: TrainingConfig, step: int, out: str | Path
) -> Path:
    """Write ``out`` as a Hugging Face model directory holding ``state``'s weights, the tokenizer,
    ``optimizer.pt`` (the optimizer's state dict after ``step`` updates) and ``optimizer.json``
    (what it holds); the directory appears complete or not at all. The model's own parameters
    are restored afterwards. Returns ``out``."""
    out = Path(out)
    named = dict(model.named_parameters())
    missing = [k for k in state.params if k not in named]
    if missing:
        raise BergsonError(f"{out}: the training state has parameter {missing[0]!r}, which the model lacks")
    backup = {k: named[k].detach().clone() for k in state.params}
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        with torch.no_grad():
            for k, v in state.params.items():
                named[k].copy_(v)
            model.save_pretrained(tmp)  # type: ignore[operator]
    finally:
        with torch.no_grad():
            for k, v in backup.items():
                named[k].copy_(v)
    tokenizer.save_pretrained(tmp)
    torch.save(optimizer_state_dict(recipe, state, step), tmp / OPTIMIZER_FILE)
    info = optimizer_info(recipe, step)
    (tmp / OPTIMIZER_INFO).write_text(json.dumps(info, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out


def trainer_state(
    recipe: TrainingConfig, losses: list[float], total: int, steps_per_epoch: int
) -> dict[str, Any]:
    """The Hugging Face Trainer's ``trainer_state.json`` after ``len(losses)`` of ``total`` steps
    (fields of ``transformers.TrainerState``; one ``log_history`` entry per step)."""
    done = len(losses)
    history = [
        {
            "epoch": round(k / steps_per_epoch, 6),
            "step": k,
            "learning_rate": learning_rate(recipe, k - 1, total),
            "loss": float(losses[k - 1]),
        }
        for k in range(1, done + 1)
    ]
    return {
        "global_step": done,
        "max_steps": total,
        "epoch": done / steps_per_epoch,
        "num_train_epochs": recipe.epochs,
        "logging_steps": 1,
        "train_batch_size": recipe.batch_size,
        "log_history": history,
    }


def write_trainer_state(path: Path, recipe: TrainingConfig, losses: list[float], total: int) -> None:
    """``trainer_state.json`` at ``path`` (a directory), written atomically."""
    steps_per_epoch = max(1, total // recipe.epochs)
    state = trainer_state(recipe, losses, total, steps_per_epoch)
    atomic_write_bytes(path / TRAINER_STATE, json.dumps(state, indent=2).encode())


class CheckpointWriter:
    """Writes ``root/checkpoint-<k>/`` (weights, tokenizer, optimizer.pt, trainer_state.json) as
    training passes each chosen step k; steps already written (a resumed run) are skipped."""

    def __init__(
        self,
        root: Path,
        model: nn.Module,
        tokenizer: Any,
        recipe: TrainingConfig,
        steps: list[int],
        total: int,
    ):
        self.root, self.model, self.tokenizer, self.recipe = root, model, tokenizer, recipe
        self.steps, self.total = set(steps), total

    def __call__(self, step: int, state: State, losses: list[float]) -> None:
        """Called with the state after ``step`` updates and the losses of those updates."""
        if step not in self.steps:
            return
        out = self.root / f"checkpoint-{step}"
        if (out / TRAINER_STATE).is_file():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        save_training_state(self.model, self.tokenizer, state, self.recipe, step, out)
        write_trainer_state(out, self.recipe, losses[:step], self.total)
        logger.info("magic: wrote the training checkpoint %s", out)
