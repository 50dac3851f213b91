"""The training recipe as maths: data order, learning-rate schedule, clipping and the optimizer
update, written with differentiable tensor operations on a :class:`State` (parameters and
optimizer slots), so that :mod:`.replay` can differentiate through them."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...config import TrainingConfig
from ...errors import BergsonError

Tensors = dict[str, torch.Tensor]


def check_recipe(recipe: TrainingConfig) -> None:
    """An error naming the option for a recipe that cannot be trained as written."""
    checks = [
        ("lr", recipe.lr > 0, "must be > 0"),
        ("beta1", 0 <= recipe.beta1 < 1, "must be in [0, 1)"),
        ("beta2", 0 <= recipe.beta2 < 1, "must be in [0, 1)"),
        ("eps", recipe.eps > 0, "must be > 0"),
        ("eps_root", recipe.eps_root >= 0, "must be >= 0"),
        ("lr_start", recipe.lr_start >= 0, "must be >= 0"),
        ("lr_end", recipe.lr_end >= 0, "must be >= 0"),
        ("power", recipe.power > 0, "must be > 0"),
        ("momentum", 0 <= recipe.momentum < 1, "must be in [0, 1)"),
        ("weight_decay", recipe.weight_decay >= 0, "must be >= 0"),
        ("warmup_steps", recipe.warmup_steps >= 0, "must be >= 0"),
        ("max_grad_norm", recipe.max_grad_norm >= 0, "must be >= 0 (0: no clipping)"),
    ]
    for name, ok, why in checks:
        if not ok:
            raise BergsonError(f"--training.{name} {getattr(recipe, name)}: {why}")
    if recipe.optimizer not in ("adamw", "sgd"):
        raise BergsonError(f"--training.optimizer {recipe.optimizer!r}: choose adamw or sgd")
    if recipe.schedule not in ("constant", "linear", "cosine", "polynomial"):
        raise BergsonError(
            f"--training.schedule {recipe.schedule!r}: choose constant, linear, cosine or polynomial"
        )
    for name, default in (("lr_end", 0.0), ("power", 1.0)):
        if recipe.schedule != "polynomial" and getattr(recipe, name) != default:
            raise BergsonError(
                f"--training.{name} {getattr(recipe, name)}: it shapes the polynomial decay, and the schedule "
                f"is {recipe.schedule}; pass --training.schedule polynomial or drop it"
            )


def trained_names(trainable: Sequence[str], freeze: Sequence[str]) -> list[str]:
    """The parameters the recipe trains: the ``trainable`` ones that no ``--training.freeze``
    pattern (fnmatch) matches. A pattern that matches nothing is an error, as is freezing all."""
    from fnmatch import fnmatch

    names = [n for n in trainable if not any(fnmatch(n, pat) for pat in freeze)]
    unused = [pat for pat in freeze if not any(fnmatch(n, pat) for n in trainable)]
    if unused:
        raise BergsonError(
            f"--training.freeze {unused[0]!r} matches no parameter; names look like {trainable[0]!r}"
        )
    if not names:
        raise BergsonError("the model has no trainable parameters (check --training.freeze)")
    return names


def plan_steps(num_docs: int, recipe: TrainingConfig) -> list[list[np.ndarray]]:
    """Document indices of every micro-batch of every optimizer step, in training order.

    Each epoch is a fresh permutation seeded by (seed, epoch); micro-batches of
    ``batch_size`` documents are grouped ``grad_accumulation`` to a step (the last step of
    an epoch may be short).
    """
    if recipe.batch_size < 1 or recipe.grad_accumulation < 1 or recipe.epochs < 1:
        raise BergsonError(
            "--training.batch_size, --training.grad_accumulation and --training.epochs must be >= 1"
        )
    steps: list[list[np.ndarray]] = []
    for epoch in range(recipe.epochs):
        gen = torch.Generator().manual_seed(recipe.seed * 1_000_003 + epoch)
        order = torch.randperm(num_docs, generator=gen).numpy()
        micro = [order[i : i + recipe.batch_size] for i in range(0, num_docs, recipe.batch_size)]
        steps += [
            micro[i : i + recipe.grad_accumulation] for i in range(0, len(micro), recipe.grad_accumulation)
        ]
    return steps


def warmup_steps(recipe: TrainingConfig, total: int) -> int:
    """The warmup length in steps: ``warmup_steps`` itself, or a fraction in (0, 1) of ``total``
    rounded up."""
    w = recipe.warmup_steps
    if 0 < w < 1:
        return math.ceil(total * w)
    if w != int(w):
        raise BergsonError(
            f"--training.warmup_steps {w}: a number of steps (whole) or a fraction of the total in (0, 1)"
        )
    return int(w)


def learning_rate(recipe: TrainingConfig, step: int, total: int) -> float:
    """transformers' get_{constant,linear,cosine,polynomial_decay}_schedule_with_warmup at ``step``
    (0-based), the warmup rising linearly from ``lr_start`` (0 in transformers) to ``lr``."""
    warm = warmup_steps(recipe, total)
    if step < warm:
        return recipe.lr_start + (recipe.lr - recipe.lr_start) * step / max(1, warm)
    if recipe.schedule == "constant":
        return recipe.lr
    progress = min(1.0, (step - warm) / max(1, total - warm))
    if recipe.schedule == "linear":
        return recipe.lr * max(0.0, 1.0 - progress)
    if recipe.schedule == "polynomial":
        return recipe.lr_end + (recipe.lr - recipe.lr_end) * (1.0 - progress) ** recipe.power
    return recipe.lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """sqrt with derivative 0 (not ∞) at 0: a moment that is exactly 0 (an embedding row no batch
    touched) has a zero gradient that no weight can change, so its derivative term vanishes."""
    pos = v > 0
    return torch.where(pos, torch.where(pos, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


@dataclass
class State:
    """A training state: parameters and the optimizer's per-parameter slots."""

    params: Tensors
    slots: dict[str, Tensors]

    def tensors(self) -> list[torch.Tensor]:
        return [*self.params.values(), *(t for s in self.slots.values() for t in s.values())]

    def like(self, flat: Sequence[torch.Tensor]) -> State:
        it = iter(flat)
        params = {k: next(it) for k in self.params}
        slots = {name: {k: next(it) for k in s} for name, s in self.slots.items()}
        return State(params, slots)

    def detached(self, requires_grad: bool = False) -> State:
        return self.like([t.detach().requires_grad_(requires_grad) for t in self.tensors()])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def save(self, path: Path, meta: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        flat = {f"params/{k}": v.detach().contiguous().cpu() for k, v in self.params.items()}
        for name, s in self.slots.items():
            flat.update({f"{name}/{k}": v.detach().contiguous().cpu() for k, v in s.items()})
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(flat, str(tmp), metadata={"meta": json.dumps(meta)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, template: State, device: torch.device) -> tuple[State, dict[str, Any]]:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
            params = {k: f.get_tensor(f"params/{k}").to(device) for k in template.params}
            slots = {
                n: {k: f.get_tensor(f"{n}/{k}").to(device) for k in s} for n, s in template.slots.items()
            }
        return cls(params, slots), meta


def zero_slots_state(recipe: TrainingConfig, params: Tensors) -> State:
    """``params`` with the optimizer's slots at zero: AdamW's moments ``m`` and ``v``, or SGD's
    momentum buffer ``buf`` (what :func:`optimizer_update` reads and writes)."""
    names = ("m", "v") if recipe.optimizer == "adamw" else ("buf",)
    return State(params, {n: {k: torch.zeros_like(v) for k, v in params.items()} for n in names})


def optimizer_update(recipe: TrainingConfig, state: State, grads: Tensors, step: int, lr: float) -> State:
    """One AdamW or SGD update (torch.optim semantics), written with differentiable tensor ops."""
    params, new_params = state.params, {}
    if recipe.optimizer == "adamw":
        b1, b2 = recipe.beta1, recipe.beta2
        bc1, bc2 = 1 - b1 ** (step + 1), 1 - b2 ** (step + 1)
        m_new, v_new = {}, {}
        for k, p in params.items():
            g = grads[k]
            m = b1 * state.slots["m"][k] + (1 - b1) * g
            v = b2 * state.slots["v"][k] + (1 - b2) * g * g
            if recipe.eps_root:  # sqrt(v_hat + eps_root): differentiable everywhere
                denom = torch.sqrt(v / bc2 + recipe.eps_root) + recipe.eps
            else:
                denom = _safe_sqrt(v) / math.sqrt(bc2) + recipe.eps
            new_params[k] = p * (1 - lr * recipe.weight_decay) - (lr / bc1) * m / denom
            m_new[k], v_new[k] = m, v
        return State(new_params, {"m": m_new, "v": v_new})
    buf_new = {}  # sgd (check_recipe admits no other optimizer)
    for k, p in params.items():
        g = grads[k] + recipe.weight_decay * p if recipe.weight_decay else grads[k]
        buf = recipe.momentum * state.slots["buf"][k] + g if recipe.momentum else g
        new_params[k] = p - lr * buf
        buf_new[k] = buf
    return State(new_params, {"buf": buf_new})


def clip(grads: Tensors, max_norm: float) -> Tensors:
    """torch.nn.utils.clip_grad_norm_ as a function: scale by min(1, max_norm / (‖g‖ + 1e-6))."""
    if max_norm <= 0:
        return grads
    norm = torch.sqrt(sum((g * g).sum() for g in grads.values()))  # type: ignore[arg-type]
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return {k: g * scale for k, g in grads.items()}
