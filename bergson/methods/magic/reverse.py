"""The reverse pass: checkpoints of the training states and the metagradient ∂Q/∂w.

:class:`MagicRun` trains once through :class:`.replay.Replay`, saving the states that the
checkpoint schedule names, then walks the steps backwards, carrying the cotangent
λ_t = ∂Q/∂s_t through each step's vector-Jacobian product and summing the token-weight terms.
The states it needs are kept, read from disk or replayed from the nearest earlier one:

* ``every``: all states on disk, no replay;
* ``sqrt``: every ~√T steps; each segment is replayed once, its states kept in memory
  (spilling to disk beyond a budget);
* ``log``: states 0, T/2, 3T/4, ...; each segment is bisected recursively, O(log T) states
  in memory and O(T log T) replayed steps.

Training and every reverse pass resume where a killed process stopped.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ... import distributed
from ...core.allocator import allocated_bytes
from ...errors import BergsonError
from .recipe import State, Tensors, zero_slots_state
from .replay import Replay, StepGraph, math_attention

logger = logging.getLogger(__name__)


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


SAVE_EVERY_S = 30.0
"""Default seconds between saves of a reverse pass's progress file."""

PROGRESS = "_progress"
"""Slot name of the accumulated weight gradients in a reverse pass's progress file."""


@dataclass
class ReverseResult:
    token_grads: np.ndarray
    """∂Q/∂w per training token (flat layout of :class:`TokenWeights`), float64: [tokens] for
    one query cotangent, [tokens, Q] for a list of Q carried through one pass."""
    replayed_steps: int
    """Steps run forward without a graph to recover states (the checkpoint schedule's replays)."""
    peak_states_in_memory: int
    graph_steps: int = 0
    """Replayed steps built with their graphs and kept for the reverse step (no separate forward)."""


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
        self.save_every_s = SAVE_EVERY_S
        """Seconds between saves of the reverse pass's progress (at segment ends)."""
        self.batched = "loop"
        """How a step's second backward runs over several cotangents (see ``Replay.graph_vjp``)."""
        self.resume_steps = set(checkpoint_steps("sqrt", self.total))
        self.spill_dir = self.states_dir / (
            "spill" if distributed.world_size() == 1 else f"spill-{distributed.rank()}"
        )
        self.kept = StateCache(memory_budget // 2, self.spill_dir, self.template, replay.device)
        # whether graphs can be kept (the memory they take measured): on every rank or none
        self.measurable = all(distributed.all_gather_objects(allocated_bytes(replay.device) is not None))
        self.writes = distributed.rank() == 0
        """Whether this process writes the run's files (rank 0 of a data-parallel run)."""

    def _path(self, t: int) -> Path:
        return self.states_dir / f"step_{t:07d}.safetensors"

    def _load(self, t: int) -> tuple[State, dict[str, Any]]:
        return State.load(self._path(t), self.template, self.replay.device)

    def train(
        self, on_step: Callable[[int, State, list[float]], None] | None = None
    ) -> tuple[State, list[float]]:
        """Train once, saving the scheduled states and the final one; resumes from the last saved.

        ``on_step(k, state, losses)``, when given, is called by the writing rank with the state
        after each update k (1-based) that this call trains, and the losses of updates 1..k."""
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
        with math_attention():
            for t in bar:
                if t in self.steps:
                    self.kept.put(t, s)
                if self.writes and t in self.resume_steps and not self._path(t).is_file():
                    s.save(self._path(t), {"step": t, "losses": losses})
                s, loss = self.replay.step(s, t, self.weights)
                losses.append(loss)
                bar.set_postfix(loss=f"{loss:.4f}")
                if on_step is not None and self.writes:
                    on_step(t + 1, s, losses)
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

    def _advance(self, s: State, a: int, b: int) -> State:
        with torch.no_grad(), math_attention():
            for t in range(a, b):
                s, _ = self.replay.step(s, t, self.weights)
        self.replayed += b - a
        return s

    def reverse(
        self,
        final_cotangent: Tensors | Sequence[Tensors],
        progress_path: Path | None = None,
        first_step: int = 0,
    ) -> ReverseResult:
        """∂Q/∂w given ∂Q/∂θ_T; resumable through ``progress_path``.

        ``final_cotangent`` is one query's ∂Q/∂θ_T, or a list of Q of them: the Q cotangents
        then travel through one pass (each step's replay, forward and create_graph gradient
        shared; the progress file holds all Q) and ``token_grads`` has a column per query.

        With ``first_step`` > 0 the pass is truncated: it differentiates through steps
        ``first_step .. T-1`` only, as if the state at ``first_step`` did not depend on the
        weights (the tokens trained on only before it get zero)."""
        self.replayed = self.graph_steps = 0
        self.peak_in_memory = 0
        single = isinstance(final_cotangent, dict)
        finals = [final_cotangent] if isinstance(final_cotangent, dict) else list(final_cotangent)
        if not finals:
            raise BergsonError("a reverse pass needs at least one query cotangent")
        # the final state's cotangents: ∂Q/∂θ_T stacked over the queries, nothing through the slots
        cot = zero_slots_state(
            self.replay.recipe,
            {k: torch.stack([c[k].detach() for c in finals]) for k in self.template.params},
        )
        acc = torch.zeros(len(finals), self.replay.layout.size, dtype=torch.float64)
        bounds = [*self.steps, self.total]
        segment = len(self.steps) - 1
        if progress_path is not None and progress_path.is_file():
            # one file holds the cotangent and the weight gradients so far: saved atomically together
            with_acc = State(self.template.params, {**self.template.slots, PROGRESS: {"acc": acc}})
            loaded, meta = State.load(progress_path, with_acc, self.replay.device)
            acc = loaded.slots.pop(PROGRESS)["acc"].double().cpu()
            if acc.shape != (len(finals), self.replay.layout.size):
                raise BergsonError(
                    f"{progress_path}: a reverse pass's progress for {acc.shape[0]} queries, resumed with "
                    f"{len(finals)}; delete the file (or rerun with --overwrite)"
                )
            cot = loaded
            segment = int(meta["next_segment"])
        last_save = time.perf_counter()
        bar = tqdm(
            total=bounds[segment + 1] - first_step,
            desc="reverse",
            unit="step",
            disable=not self.replay.progress,
        )
        bar.update(self.total - bounds[segment + 1])
        while segment >= 0 and bounds[segment + 1] > first_step:
            a, b = bounds[segment], bounds[segment + 1]
            s_a = self._state_at(a)
            if a < first_step:  # the truncation falls inside this segment
                s_a, a = self._advance(s_a, a, first_step), first_step
            if self.schedule == "log":
                cot = self._bisect(s_a, a, b, cot, acc, bar)
            else:
                cot = self._linear(s_a, a, b, cot, acc, bar)
            segment -= 1
            if (
                progress_path is not None
                and self.writes
                and segment >= 0
                and bounds[segment + 1] > first_step
                and time.perf_counter() - last_save >= self.save_every_s
            ):
                progress = State(cot.params, {**cot.slots, PROGRESS: {"acc": acc}})
                progress.save(progress_path, {"next_segment": segment})
                last_save = time.perf_counter()
        bar.close()
        grads = acc.numpy()
        return ReverseResult(
            grads[0] if single else grads.T.copy(), self.replayed, self.peak_in_memory, self.graph_steps
        )

    def _step_back(self, s: State | StepGraph, t: int, cot: State, acc: torch.Tensor, bar: Any) -> State:
        graph = s if isinstance(s, StepGraph) else self.replay.step_graph(s, t, self.weights)
        cot, wgrad = self.replay.graph_vjp(graph, cot, self.batched)
        acc += wgrad.double().cpu()
        bar.update(1)
        return cot

    def _linear(self, s_a: State, a: int, b: int, cot: State, acc: torch.Tensor, bar: Any) -> State:
        """Replay a segment forwards, then step back through it.

        While they fit in half the memory budget (measured as each is built), the replay builds
        the steps with their graphs (:meth:`Replay.step_graph`) and keeps them: the reverse step
        then needs only its second backward, and the replay costs no separate forward. The
        steps beyond keep their states and rebuild their graphs when stepped back through."""
        room = self.memory_budget // 2
        graphs: dict[int, StepGraph] = {}
        with tempfile.TemporaryDirectory(dir=self.root, prefix=".replay-") as tmp:
            cache = StateCache(0, Path(tmp), self.template, self.replay.device)
            building, s, size = self.measurable, s_a, 0
            for t in range(a, b):
                building = building and room > size
                if building:
                    before = allocated_bytes(self.replay.device) or 0
                    graphs[t] = self.replay.step_graph(s, t, self.weights)
                    size = self._graph_bytes(before)
                    room -= size
                    s = graphs[t].new.detached()
                    self.graph_steps += t + 1 < b  # a replayed step that needed no forward of its own
                    continue
                cache.budget = max(0, room)  # the states beyond the graphs share what room is left
                cache.put(t, s)
                if t + 1 < b:
                    s = self._advance(s, t, t + 1)
            kept = len(graphs) + len(cache.memory)
            self.peak_in_memory = max(self.peak_in_memory, kept + len(self.kept.memory))
            for t in range(b - 1, a - 1, -1):
                cot = self._step_back(graphs.pop(t) if t in graphs else cache.pop(t), t, cot, acc, bar)
        return cot

    def _graph_bytes(self, before: int) -> int:
        """Bytes the graph just built holds (memory in use now less ``before``); under data
        parallelism the largest over the ranks, so that every rank keeps the same steps' graphs
        and its replays and reverse steps run the same collectives in the same order."""
        size = max(0, (allocated_bytes(self.replay.device) or 0) - before)
        return max(distributed.all_gather_objects(size))

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
