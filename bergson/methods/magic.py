"""MAGIC: exact attribution by differentiating the query loss through a whole training run.

Every training token carries a weight w (all ones). A step's loss is

    L_t(θ, w) = Σ_{tokens k of the step} w_k ℓ_k(θ) / Σ_k w_k

(the Hugging Face Trainer's mean over the step's loss tokens; with w ∈ {0, 1} it is exactly the
loss of the same batches without the zero-weight tokens). The optimizer update (AdamW or SGD
with momentum, a learning-rate schedule, clipping, accumulation) makes the training state
s = (θ, optimizer moments) a differentiable function s_{t+1} = f_t(s_t, w), and the query
loss Q(θ_T) a function of w. A token's score is −∂Q/∂w_k (positive: training on it lowers the
query loss, the orientation of every bergson score); a document's is the sum over its tokens
(the derivative with respect to one weight shared by all of them), so removing a set of
documents changes the query loss by about the sum of their scores.

The reverse pass runs backwards over the steps with the cotangent λ_t = ∂Q/∂s_t:
λ_t = λ_{t+1} ∂f_t/∂s_t and ∂Q/∂w += λ_{t+1} ∂f_t/∂w, each a double backward through the
gradient of L_t (create_graph) and through the update. It needs s_t for every t, replayed
from the checkpoints the forward pass saved:

* ``every``: all states on disk, no replay;
* ``sqrt``: every ~√T steps; each segment is replayed once, its states kept in memory
  (spilling to disk beyond a budget);
* ``log``: states 0, T/2, 3T/4, ...; each segment is bisected recursively, O(log T) states
  in memory and O(T log T) replayed steps.

Attention runs the math SDPA kernel (double-backward safe, and the same kernel in the forward
and reverse passes, so replayed states equal the trained ones). Dropout is off (the model stays
in eval mode) so that replay is deterministic.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..config import MagicConfig, TrainingConfig
from ..data import TokenizedDocs
from ..data.batching import IGNORE, pad_batch
from ..errors import BergsonError
from ..models import honours_numerics

logger = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# The recipe: data order, schedule, optimizer update


def check_recipe(recipe: TrainingConfig) -> None:
    """An error naming the option for a recipe that cannot be trained as written."""
    checks = [
        ("lr", recipe.lr > 0, "must be > 0"),
        ("beta1", 0 <= recipe.beta1 < 1, "must be in [0, 1)"),
        ("beta2", 0 <= recipe.beta2 < 1, "must be in [0, 1)"),
        ("eps", recipe.eps > 0, "must be > 0"),
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
    if recipe.schedule not in ("constant", "linear", "cosine"):
        raise BergsonError(f"--training.schedule {recipe.schedule!r}: choose constant, linear or cosine")


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


def learning_rate(recipe: TrainingConfig, step: int, total: int) -> float:
    """transformers' get_{constant,linear,cosine}_schedule_with_warmup at ``step`` (0-based)."""
    warm = recipe.warmup_steps
    if step < warm:
        return recipe.lr * step / max(1, warm)
    if recipe.schedule == "constant":
        return recipe.lr
    progress = (step - warm) / max(1, total - warm)
    if recipe.schedule == "linear":
        return recipe.lr * max(0.0, 1.0 - progress)
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


# ---------------------------------------------------------------------------------------------
# Training as a function of the token weights


def _token_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per position, [B, T] (0 where the target is IGNORE); half-precision
    logits are upcast."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="none"
    )
    return ce.view(target.shape)


@dataclass
class MicroBatch:
    ids: torch.Tensor  # [B, T]
    target: torch.Tensor  # [B, T] next-token target of position t (IGNORE where none)
    weight_index: torch.Tensor  # [B, T] index into the flat token-weight vector (0 where no loss)
    mask: torch.Tensor  # [B, T] bool: position t's prediction carries loss

    def share(self, rank: int, world: int) -> MicroBatch:
        """Rows rank, rank + world, ... (one rank's documents under data parallelism)."""
        return MicroBatch(*(x[rank::world] for x in (self.ids, self.target, self.weight_index, self.mask)))


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
        from fnmatch import fnmatch

        named = [n for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n in named if not any(fnmatch(n, pat) for pat in recipe.freeze)]
        unused = [pat for pat in recipe.freeze if not any(fnmatch(n, pat) for n in named)]
        if unused:
            raise BergsonError(
                f"--training.freeze {unused[0]!r} matches no parameter; names look like {named[0]!r}"
            )
        if not self.names:
            raise BergsonError("the model has no trainable parameters (check --training.freeze)")
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
            target = torch.full_like(labels, IGNORE)
            target[:, :-1] = labels[:, 1:]
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
        params = {k: v.clone() for k, v in self._initial.items()}
        zeros = {k: torch.zeros_like(v) for k, v in params.items()}
        if self.recipe.optimizer == "adamw":
            return State(params, {"m": zeros, "v": {k: torch.zeros_like(v) for k, v in params.items()}})
        return State(params, {"buf": zeros})

    def token_losses(self, params: Tensors, batch: MicroBatch) -> torch.Tensor:
        """Cross-entropy of every position's next-token prediction, [B, T] (0 where no loss)."""
        from torch.func import functional_call

        logits = functional_call(self.model, params, (batch.ids,), {"use_cache": False}).logits
        return _token_ce(logits, batch.target)

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
                loss = (self.token_losses(leaves, b) * wb.to(params[keys[0]].dtype)).sum() / denom
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

    def run(self, weights: torch.Tensor | None = None) -> tuple[State, list[float]]:
        """The whole run without a graph (token weights default to ones): final state, step losses."""
        w = self.ones() if weights is None else weights
        s = self.initial_state()
        losses = []
        with _math_attention():
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
    from torch.func import functional_call

    device = next(iter(params.values())).device
    out = []
    for i in range(0, len(queries), batch_size):
        idx = np.arange(i, min(i + batch_size, len(queries)))
        ids, labels = pad_batch(queries, idx, pad_token_id)
        ids, labels = ids.to(device), labels.to(device)
        logits = functional_call(model, params, (ids,), {"use_cache": False}).logits
        target = torch.full_like(labels, IGNORE)
        target[:, :-1] = labels[:, 1:]
        ce = _token_ce(logits, target)
        n = (target != IGNORE).sum(1)
        if bool((n == 0).any()):
            raise BergsonError(f"query row {int(idx[int((n == 0).nonzero()[0])])} has no loss token")
        out.append(ce.sum(1) / n)
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# Checkpoints and the reverse pass


def checkpoint_steps(schedule: str, total: int) -> list[int]:
    """Steps whose state the forward pass saves (always 0; the final state T is saved apart)."""
    if total < 1:
        raise BergsonError("the training run has no steps")
    if schedule == "every":
        return list(range(total))
    if schedule == "sqrt":
        k = max(1, math.ceil(math.sqrt(total)))
        return list(range(0, total, k))
    if schedule == "log":
        out, c = [0], 0
        while total - c > 1:
            c += (total - c + 1) // 2
            out.append(c)
        return out
    raise BergsonError(f"--checkpoints {schedule!r}: choose every, sqrt or log")


class StateCache:
    """Replayed states by step: in memory up to ``budget`` bytes, then spilled to ``spill_dir``."""

    def __init__(self, budget: int, spill_dir: Path, template: State, device: torch.device):
        self.budget, self.spill_dir, self.template, self.device = budget, spill_dir, template, device
        self.memory: dict[int, State] = {}
        self.disk: set[int] = set()
        self.used = 0
        self.spilled = 0

    def put(self, t: int, s: State) -> None:
        size = s.nbytes()
        if self.used + size <= self.budget:
            self.memory[t] = s
            self.used += size
            return
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        s.save(self.spill_dir / f"{t}.safetensors", {})
        self.disk.add(t)
        self.spilled += 1

    def __contains__(self, t: int) -> bool:
        return t in self.memory or t in self.disk

    def get(self, t: int) -> State:
        """The state at ``t``, kept where it is."""
        if t in self.memory:
            return self.memory[t]
        return State.load(self.spill_dir / f"{t}.safetensors", self.template, self.device)[0]

    def pop(self, t: int) -> State:
        if t in self.memory:
            s = self.memory.pop(t)
            self.used -= s.nbytes()
            return s
        self.disk.remove(t)
        path = self.spill_dir / f"{t}.safetensors"
        s, _ = State.load(path, self.template, self.device)
        path.unlink()
        return s


PROGRESS = "_progress"
"""Slot name of the accumulated weight gradients in a reverse pass's progress file."""


@dataclass
class ReverseResult:
    token_grads: np.ndarray
    """∂Q/∂w per training token (flat layout of :class:`TokenWeights`), float64."""
    replayed_steps: int
    peak_states_in_memory: int


class MagicRun:
    """The forward pass with checkpoints and the reverse passes of one recipe, in ``root``.

    The scheduled states are kept in memory (half of ``memory_budget``; beyond it they spill
    to ``root/states/spill``). Independently, every ~√T steps and at the end a state goes to
    ``root/states`` on disk, so that a killed run resumes; scheduled states lost with the
    process are replayed from the nearest saved one when the reverse pass needs them.
    """

    def __init__(self, replay: Replay, root: Path, schedule: str = "sqrt", memory_budget: int = 2 << 30):
        self.replay = replay
        self.root = Path(root)
        self.schedule = schedule
        self.memory_budget = memory_budget
        self.total = replay.num_steps
        self.steps = checkpoint_steps(schedule, self.total)
        self.states_dir = self.root / "states"
        self.template = replay.initial_state()
        self.weights = replay.ones()
        self.save_every_s = 30.0
        """Seconds between saves of the reverse pass's progress (at segment ends)."""
        self.resume_steps = set(checkpoint_steps("sqrt", self.total))
        self.spill_dir = self.states_dir / (
            "spill" if distributed.world_size() == 1 else f"spill-{distributed.rank()}"
        )
        self.kept = StateCache(memory_budget // 2, self.spill_dir, self.template, replay.device)
        self.writes = distributed.rank() == 0
        """Whether this process writes the run's files (rank 0 of a data-parallel run)."""

    def _path(self, t: int) -> Path:
        return self.states_dir / f"step_{t:07d}.safetensors"

    def _load(self, t: int) -> tuple[State, dict[str, Any]]:
        return State.load(self._path(t), self.template, self.replay.device)

    def train(self) -> tuple[State, list[float]]:
        """Train once, saving the scheduled states and the final one; resumes from the last saved."""
        self.states_dir.mkdir(parents=True, exist_ok=True)
        if self._path(self.total).is_file():
            s, meta = self._load(self.total)
            return s, meta["losses"]
        shutil.rmtree(self.spill_dir, ignore_errors=True)  # a killed process's spill
        saved = [t for t in self.resume_steps if self._path(t).is_file()]
        start = max(saved) if saved else 0
        state, meta = self._load(start) if saved else (None, {"losses": []})
        losses: list[float] = list(meta["losses"])
        if start:
            logger.info("resuming training at step %d of %d", start, self.total)

        s = state if state is not None else self.replay.initial_state()
        bar = tqdm(range(start, self.total), desc="training", unit="step", disable=not self.replay.progress)
        with _math_attention():
            for t in bar:
                if t in self.steps:
                    self.kept.put(t, s)
                if self.writes and t in self.resume_steps and not self._path(t).is_file():
                    s.save(self._path(t), {"step": t, "losses": losses})
                s, loss = self.replay.step(s, t, self.weights)
                losses.append(loss)
                bar.set_postfix(loss=f"{loss:.4f}")
        if self.writes:
            s.save(self._path(self.total), {"step": self.total, "losses": losses})
        distributed.barrier("the end of training")
        return s, losses

    # -------------------------------------------------------------------- reverse
    def _state_at(self, t: int) -> State:
        """A scheduled state: kept, on disk, or replayed from the nearest earlier one (and kept)."""
        if t in self.kept:
            return self.kept.get(t)
        if self._path(t).is_file():
            return self._load(t)[0]
        earlier = [u for u in range(t - 1, -1, -1) if u in self.kept or self._path(u).is_file()]
        if not earlier:
            raise BergsonError(
                f"{self.states_dir}: no saved training state before step {t}; rerun with --overwrite"
            )
        s = self._advance(self._state_at(earlier[0]), earlier[0], t)
        self.kept.put(t, s)
        return s

    def _vjp(self, s: State, t: int, cot: State) -> tuple[State, torch.Tensor]:
        leaf = s.detached(requires_grad=True)
        w = self.weights.detach().requires_grad_(True)  # a new leaf sharing storage, no copy
        with _math_attention():
            new, _ = self.replay.step(leaf, t, w, create_graph=True)
        outs, grads_out = [], []
        for o, c in zip(new.tensors(), cot.tensors()):
            if o.requires_grad and bool(c.any()):
                outs.append(o)
                grads_out.append(c)
        inputs = [*leaf.tensors(), w]
        got = torch.autograd.grad(outs, inputs, grads_out, allow_unused=True)
        flat = [torch.zeros_like(x) if g is None else g.detach() for x, g in zip(inputs, got)]
        if distributed.world_size() > 1:
            # each rank holds 1/world of the update's own term plus its documents' terms
            flat = sum_gradients_over_ranks(flat)
        return leaf.like(flat[:-1]), flat[-1]

    def _advance(self, s: State, a: int, b: int) -> State:
        with torch.no_grad(), _math_attention():
            for t in range(a, b):
                s, _ = self.replay.step(s, t, self.weights)
        self.replayed += b - a
        return s

    def reverse(self, final_cotangent: Tensors, progress_path: Path | None = None) -> ReverseResult:
        """∂Q/∂w given ∂Q/∂θ_T; resumable through ``progress_path``."""
        self.replayed = 0
        self.peak_in_memory = 0
        cot = State(
            {k: final_cotangent[k].detach() for k in self.template.params},
            {n: {k: torch.zeros_like(v) for k, v in sl.items()} for n, sl in self.template.slots.items()},
        )
        acc = torch.zeros(self.replay.layout.size, dtype=torch.float64)
        bounds = [*self.steps, self.total]
        segment = len(self.steps) - 1
        if progress_path is not None and progress_path.is_file():
            # one file holds the cotangent and the weight gradients so far: saved atomically together
            with_acc = State(self.template.params, {**self.template.slots, PROGRESS: {"acc": acc}})
            loaded, meta = State.load(progress_path, with_acc, self.replay.device)
            acc = loaded.slots.pop(PROGRESS)["acc"].double().cpu()
            cot = loaded
            segment = int(meta["next_segment"])
        last_save = time.perf_counter()
        bar = tqdm(total=bounds[segment + 1], desc="reverse", unit="step", disable=not self.replay.progress)
        bar.update(self.total - bounds[segment + 1])
        while segment >= 0:
            a, b = bounds[segment], bounds[segment + 1]
            s_a = self._state_at(a)
            if self.schedule == "log":
                cot = self._bisect(s_a, a, b, cot, acc, bar)
            else:
                cot = self._linear(s_a, a, b, cot, acc, bar)
            segment -= 1
            if (
                progress_path is not None
                and self.writes
                and segment >= 0
                and time.perf_counter() - last_save >= self.save_every_s
            ):
                progress = State(cot.params, {**cot.slots, PROGRESS: {"acc": acc}})
                progress.save(progress_path, {"next_segment": segment})
                last_save = time.perf_counter()
        bar.close()
        return ReverseResult(acc.numpy(), self.replayed, self.peak_in_memory)

    def _step_back(self, s: State, t: int, cot: State, acc: torch.Tensor, bar: Any) -> State:
        cot, wgrad = self._vjp(s, t, cot)
        acc += wgrad.double().cpu()
        bar.update(1)
        return cot

    def _linear(self, s_a: State, a: int, b: int, cot: State, acc: torch.Tensor, bar: Any) -> State:
        with tempfile.TemporaryDirectory(dir=self.root, prefix=".replay-") as tmp:
            cache = StateCache(self.memory_budget // 2, Path(tmp), self.template, self.replay.device)
            s = s_a
            cache.put(a, s)
            for t in range(a + 1, b):
                s = self._advance(s, t - 1, t)
                cache.put(t, s)
            self.peak_in_memory = max(self.peak_in_memory, len(cache.memory) + len(self.kept.memory))
            for t in range(b - 1, a - 1, -1):
                cot = self._step_back(cache.pop(t), t, cot, acc, bar)
        return cot

    def _bisect(
        self, s_a: State, a: int, b: int, cot: State, acc: torch.Tensor, bar: Any, depth: int = 1
    ) -> State:
        self.peak_in_memory = max(self.peak_in_memory, depth + len(self.kept.memory))
        if b - a == 1:
            return self._step_back(s_a, a, cot, acc, bar)
        mid = (a + b + 1) // 2
        s_mid = self._advance(s_a, a, mid)
        cot = self._bisect(s_mid, mid, b, cot, acc, bar, depth + 1)
        del s_mid
        return self._bisect(s_a, a, mid, cot, acc, bar, depth + 1)


@contextlib.contextmanager
def _math_attention() -> Iterator[None]:
    """The math SDPA kernel: it supports double backward everywhere (flash and
    memory-efficient kernels do not), and using it in every pass keeps replays identical."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


# ---------------------------------------------------------------------------------------------
# `bergson magic`


def check_precision(model: nn.Module, force: bool) -> None:
    """Refuse half-precision weights unless forced: a metagradient sums T steps of second-order
    terms, and bf16's 8-bit mantissa (fp16's 11) leaves mostly rounding noise."""
    dtype = next(model.parameters()).dtype
    if dtype in (torch.float16, torch.bfloat16) and not force:
        raise BergsonError(
            f"the model's weights are {str(dtype).removeprefix('torch.')}: metagradients in half precision "
            "are mostly rounding noise. Use --precision fp32 (or pass --force_low_precision to go on anyway)"
        )


def use_double_backward_attention(model: nn.Module) -> None:
    """Switch attention kernels without double-backward support (flash attention and other
    hub kernels) to SDPA, which `_math_attention` then pins to its math kernel."""
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


def query_columns(cfg: MagicConfig, num_queries: int) -> list[np.ndarray]:
    """The query rows averaged into each score column."""
    if cfg.query_mode == "aggregate":
        return [np.arange(num_queries)]
    if cfg.query_mode == "individual":
        return [np.array([j]) for j in range(num_queries)]
    raise BergsonError(f"--query_mode {cfg.query_mode!r}: choose aggregate or individual")


def load_recipe(path: str) -> MagicConfig:
    """A MAGIC config from a YAML file or from a `bergson magic` run directory."""
    from ..config import load_yaml

    p = Path(path)
    if p.is_dir():
        p = p / CONFIG_FILE
    if not p.is_file():
        raise BergsonError(
            f"--recipe {path}: neither a magic config YAML nor a run directory holding {CONFIG_FILE}"
        )
    cfg = load_yaml(MagicConfig, p)
    if not cfg.run_path and p.name == CONFIG_FILE:
        cfg = replace(cfg, run_path=str(p.parent))
    return cfg


CONFIG_FILE = "magic.yaml"
OUTPUTS = ("states", "reverse", "model", "scores")


def check_options(cfg: MagicConfig) -> None:
    """Refuse what MAGIC cannot do, before anything is written."""
    from ..config.options import validate_options
    from ..models import QUANTIZED

    validate_options(cfg)
    if not cfg.data.dataset:
        raise BergsonError("--dataset is required: the training documents")
    if not cfg.query.dataset:
        raise BergsonError("--query.dataset is required: the documents whose loss is attributed")
    if cfg.data.reward_column or cfg.query.reward_column:
        raise BergsonError(
            "--reward_column: MAGIC replays a supervised fine-tune; advantage-weighted (GRPO) losses "
            "are not supported by bergson magic"
        )
    if cfg.precision in QUANTIZED:
        raise BergsonError(
            f"bergson magic --precision {cfg.precision}: MAGIC trains the model and differentiates through training, "
            "which needs the whole model in full precision in each process; drop the option"
        )


def prepare(cfg: MagicConfig) -> tuple[nn.Module, Any, TokenizedDocs, TokenizedDocs]:
    """Load the model (fp32 unless told otherwise) and tokenize the training and query sets."""
    from ..models import load_model
    from ..runs.documents import context_size, load_docs

    check_options(cfg)
    model, tokenizer = load_model(replace(cfg, precision="fp32") if cfg.precision == "auto" else cfg)
    check_precision(model, cfg.force_low_precision)
    use_double_backward_attention(model)
    max_tokens = cfg.data.max_length or context_size(model) or 2048
    docs = load_docs(cfg.data, tokenizer, max_tokens)
    qdocs = load_docs(cfg.query, tokenizer, cfg.query.max_length or max_tokens, option="--query.dataset")
    return model, tokenizer, docs, qdocs


@distributed.entry(lambda cfg: _load_scores(cfg))
@honours_numerics
def magic(cfg: MagicConfig) -> Any:
    """Train once with checkpoints, then one reverse pass per score column; returns the scores
    store (rows = training documents). Every stage resumes where a killed run stopped.

    On several ranks (``--nproc_per_node`` or torchrun) the run is data parallel: each rank
    takes every other document of each micro-batch, in training and in the reverse passes,
    and the ranks sum their gradients (one all-reduce per step); rank 0 writes the files."""
    from ..runs.manifests import make_manifest
    from ..runs.rundir import RunDir
    from ..store import load_gradients
    from ..store.scores import save_score_matrix

    check_options(cfg)
    run_dir = RunDir(
        cfg,
        command="magic",
        what="a MAGIC run",
        config_file=CONFIG_FILE,
        outputs=OUTPUTS,
        ignore=("top_k", "device", "memory_budget_gb"),
        shared="rank 0 alone saves the training checkpoints and finished reverse passes there, and every "
        "rank decides from them where a run resumes, in step with the others",
    ).prepare()
    root = run_dir.root
    try:
        return load_gradients(root / "scores")
    except BergsonError:
        pass
    model, tokenizer, docs, qdocs = prepare(cfg)
    pad = tokenizer.pad_token_id or 0
    replay = Replay(model, docs, cfg.training, pad)
    run = MagicRun(replay, root, cfg.checkpoints, int(cfg.memory_budget_gb * 2**30))
    timings = run_dir.timings
    start = time.perf_counter()
    final, losses = run.train()
    if run.writes and "train_s" not in timings:
        timings.record("train_s", start, steps=run.total, first_loss=losses[0], last_loss=losses[-1])
    if run.writes and not (root / "model" / "config.json").is_file():
        _save_model(model, tokenizer, final.params, root / "model")
    columns = query_columns(cfg, len(qdocs))
    reverse_dir = root / "reverse"
    reverse_dir.mkdir(exist_ok=True)
    grads = []
    for j, rows in enumerate(columns):
        done = reverse_dir / f"column_{j}.done.npy"
        if done.is_file():
            grads.append(np.load(done))
            continue
        start = time.perf_counter()
        params = {k: v.detach().requires_grad_(True) for k, v in final.params.items()}
        with _math_attention():
            q = query_losses(model, params, qdocs.select(rows), pad).mean()
        cot = dict(zip(params, torch.autograd.grad(q, list(params.values()))))
        result = run.reverse(cot, reverse_dir / f"column_{j}.progress.safetensors")
        grads.append(result.token_grads)
        if not run.writes:
            continue
        tmp = done.with_name(f".{done.name}")
        np.save(tmp, result.token_grads)
        tmp.replace(done)
        timings.record(
            f"reverse_{j}_s",
            start,
            replayed_steps=result.replayed_steps,
            peak_states_in_memory=result.peak_states_in_memory,
        )
    token_scores = -np.stack(grads, 1)  # positive: up-weighting the token lowers the query loss
    tokens = np.split(token_scores, replay.layout.offsets[1:-1]) if cfg.per_token else None
    from ..config import IndexConfig

    base = make_manifest(
        IndexConfig(model=cfg.model, revision=cfg.revision, data=cfg.data, projection_dim=0),
        model,
        {},
        docs,
        int(replay.layout.lengths.max()),
    )
    info = {
        "kind": "magic",
        "mode": cfg.query_mode,
        "query_dataset": cfg.query.dataset,
        "checkpoints": cfg.checkpoints,
        "training": {"steps": run.total, **dict(vars(cfg.training))},
        "unit_normalize": False,
        "meaning": "-d(mean query loss after training)/d(document weight)",
    }
    scores = replay.layout.per_document(token_scores)
    distributed.on_rank_zero(
        lambda: save_score_matrix(root / "scores", scores, base, info, overwrite=True, tokens=tokens),
        f"writing the scores at {root / 'scores'}",
    )
    distributed.barrier("the end of the run")
    return _load_scores(cfg)


def _load_scores(cfg: MagicConfig) -> Any:
    from ..store import load_gradients

    return load_gradients(Path(cfg.run_path) / "scores")


def _save_model(model: nn.Module, tokenizer: Any, params: Tensors, path: Path) -> None:
    """The fine-tuned model as a Hugging Face directory (for other methods and for validate)."""
    named = dict(model.named_parameters())
    backup = {k: named[k].detach().clone() for k in params}
    with torch.no_grad():
        for k, v in params.items():
            named[k].copy_(v)
        tmp = path.with_name(f".{path.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(tmp)  # type: ignore[operator]
        tokenizer.save_pretrained(tmp)
        tmp.replace(path)
        for k, v in backup.items():
            named[k].copy_(v)
