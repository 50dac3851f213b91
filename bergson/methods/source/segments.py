"""SOURCE's segments: which checkpoint stands for which optimizer steps, at which learning rates.

Either given explicitly (``--models`` with ``--segment_steps`` and ``--segment_learning_rates``:
segment l is K_l steps at the constant rate η_l) or read from Hugging Face Trainer output
directories (``--segments``): the ``checkpoint-N/`` subdirectories, sorted by N, and
``trainer_state.json`` (the directory's own, or the newest checkpoint's). Its ``log_history``
entries with ``step`` and ``learning_rate`` give the rates; a step without an entry of its own
takes the rate of the next logged step (the last logged one after it), piecewise constant. Each
step goes to the checkpoint nearest the step's middle (ties to the earlier one): checkpoint i
covers the steps from the midpoint with the previous checkpoint (or step 0) to the midpoint with
the next (or the stage's final step). The optimizer is the one the trainer state names, else
the one the newest checkpoint's ``optimizer.pt`` shows (Adam's betas, SGD's momentum), recorded
since SOURCE models plain gradient descent. Several directories are successive stages (pretraining,
then fine-tuning): their steps continue one after the other.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import BergsonError

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class Segment:
    """One checkpoint and the optimizer steps it stands for (global numbering, 1-based)."""

    checkpoint: str
    lrs: list[float]
    """The learning rate of each step of the segment."""
    first_step: int = 0
    """The first step (global, 1-based); 0 for explicit segments."""
    stage: int = 0
    """Which --segments directory the checkpoint came from (0 for explicit segments)."""
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.lrs)

    def record(self) -> dict[str, Any]:
        """What the manifest says of the segment."""
        return {
            "checkpoint": self.checkpoint,
            "steps": self.steps,
            "first_step": self.first_step,
            "last_step": self.first_step + self.steps - 1 if self.first_step else 0,
            "learning_rate_sum": math.fsum(self.lrs),
            "stage": self.stage,
            **self.notes,
        }


def explicit_segments(models: list[str], steps: list[int], lrs: list[float]) -> list[Segment]:
    """Segments from --models, --segment_steps and --segment_learning_rates."""
    if not models:
        raise BergsonError("--models (or --model) or --segments is required: the checkpoints of the run")
    if not steps or not lrs:
        raise BergsonError(
            "--models needs --segment_steps and --segment_learning_rates (one value per checkpoint: the "
            "steps each checkpoint stands for and their learning rate), or give --segments TRAINER_DIR"
        )
    for option, values in (("--segment_steps", steps), ("--segment_learning_rates", lrs)):
        if len(values) != len(models):
            raise BergsonError(
                f"{option}: {len(values)} values for {len(models)} checkpoints in --models; give one per checkpoint"
            )
        if any(not v >= 0 for v in values):
            raise BergsonError(f"{option} {' '.join(map(str, values))}: values must be >= 0")
    return [Segment(m, [float(eta)] * int(k)) for m, k, eta in zip(models, steps, lrs)]


def _checkpoints(root: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT.match(p.name))]
    return sorted(found)


def _state(root: Path, checkpoints: list[tuple[int, Path]]) -> tuple[dict[str, Any], Path]:
    """The trainer state of a stage: the directory's own (written at the end of training), else the
    newest checkpoint's."""
    candidates = [root / "trainer_state.json"] + [p / "trainer_state.json" for _, p in reversed(checkpoints)]
    for path in candidates:
        if path.is_file():
            try:
                return json.loads(path.read_text()), path
            except json.JSONDecodeError as e:
                raise BergsonError(f"--segments {root}: {path} is not valid JSON ({e})") from e
    raise BergsonError(
        f"--segments {root}: no trainer_state.json in the directory or its checkpoints; SOURCE needs the "
        "logged learning rates (or give --models with --segment_steps and --segment_learning_rates)"
    )


def stage_schedule(root: Path) -> tuple[list[tuple[int, Path]], list[float], dict[str, Any]]:
    """One Trainer output directory: its checkpoints (step, path), the learning rate of each of its
    steps 1..T, and what to record (the state file, how many rates were logged, the optimizer)."""
    if not root.is_dir():
        raise BergsonError(f"--segments {root}: no such directory")
    checkpoints = _checkpoints(root)
    if not checkpoints:
        raise BergsonError(
            f"--segments {root}: no checkpoint-N/ subdirectories (a Trainer output directory has them)"
        )
    state, path = _state(root, checkpoints)
    logged: dict[int, float] = {}
    for entry in state.get("log_history", []):
        if isinstance(entry, dict) and "step" in entry and "learning_rate" in entry:
            logged[int(entry["step"])] = float(entry["learning_rate"])
    if not logged:
        raise BergsonError(
            f"--segments {root}: {path} logs no learning rate (log_history entries with 'step' and "
            "'learning_rate'); train with logging on, or give the schedule with --models, --segment_steps "
            "and --segment_learning_rates"
        )
    if any(eta < 0 for eta in logged.values()):
        raise BergsonError(f"--segments {root}: {path} logs a negative learning rate")
    final = max(int(state.get("global_step") or state.get("max_steps") or 0), checkpoints[-1][0])
    marks = sorted(logged)
    lrs, j = [], 0
    for step in range(1, final + 1):
        while j < len(marks) - 1 and marks[j] < step:
            j += 1
        lrs.append(logged[marks[j]])
    optimizer = (
        state.get("optimizer") or state.get("optim") or optimizer_of(checkpoints[-1][1] / "optimizer.pt")
    )
    notes: dict[str, Any] = {
        "trainer_state": str(path),
        "logged_learning_rates": len(logged),
        "final_step": final,
    }
    if optimizer:
        notes["optimizer"] = str(optimizer)
    return checkpoints, lrs, notes


def _first_group(path: Path) -> dict[str, Any] | None:
    """The first parameter group of a torch optimizer state dict saved at ``path``, or None when there
    is no such file or it cannot be read safely."""
    if not path.is_file():
        return None
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a file torch cannot read safely says nothing about the optimizer
        return None
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not groups or not isinstance(groups[0], dict):
        return None
    return groups[0]


def optimizer_of(path: Path) -> str:
    """What a Trainer checkpoint's ``optimizer.pt`` (a torch optimizer state dict) says the
    optimizer was: "adam" (its parameter groups have betas), "sgd" (with its momentum, if any), or
    "" when there is no such file or it cannot be read safely."""
    group = _first_group(path)
    if group is None:
        return ""
    if "betas" in group:
        return f"adam (from {path.name}: betas {tuple(group['betas'])})"
    if "momentum" in group:
        mu = float(group["momentum"] or 0)
        return f"sgd (from {path.name}: momentum {mu})" if mu > 0 else f"sgd (from {path.name})"
    return ""


def momentum_of(path: Path) -> dict[str, Any] | None:
    """The momentum buffer a checkpoint's ``optimizer.pt`` says its steps followed, as SOURCE models
    it: Adam's first moment (β₁, gain 1 - β₁, the bias correction 1 / (1 - β₁ᵗ) on the rates), or
    SGD's momentum (μ, gain 1 - dampening); with ``modelled`` False and the reason where it cannot be
    (Nesterov's look-ahead). None: no optimizer state, or no momentum in it."""
    group = _first_group(path)
    if group is None:
        return None
    if "betas" in group:
        beta = float(group["betas"][0])
        if beta <= 0:
            return None
        return {"form": "adam", "beta": beta, "gain": 1 - beta, "bias_correction": True, "modelled": True}
    beta = float(group.get("momentum") or 0)
    if beta <= 0:
        return None
    record = {"form": "sgd", "beta": beta, "gain": 1 - float(group.get("dampening") or 0), "modelled": True}
    record["bias_correction"] = False
    if group.get("nesterov"):
        record.update(modelled=False, note="Nesterov momentum is not modelled")
    return record


def segment_momentum(segments: list[Segment], stages: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
    """Per segment, the momentum its stage's optimizer kept (:func:`momentum_of` of the stage's newest
    checkpoint with an ``optimizer.pt``; None without one) with ``lrs``, the segment's learning rates
    times Adam's bias correction 1 / (1 - β₁ᵗ), t counted from the start of the stage (from the first
    checkpoint with --models, whose segments are one stage)."""
    found: dict[int, dict[str, Any] | None] = {}
    for seg in reversed(segments):
        if found.get(seg.stage) is None:
            found[seg.stage] = momentum_of(Path(seg.checkpoint) / "optimizer.pt")
    out: list[dict[str, Any] | None] = []
    explicit_step = 1
    for seg in segments:
        if seg.first_step and seg.stage < len(stages):
            first = seg.first_step - int(stages[seg.stage].get("first_step", 1)) + 1
        else:
            first = explicit_step
        explicit_step += seg.steps
        record = found.get(seg.stage)
        if record is not None:
            record = dict(record)
            lrs = list(seg.lrs)
            if record["bias_correction"]:
                lrs = [eta / (1 - record["beta"] ** (first + i)) for i, eta in enumerate(lrs)]
            record["lrs"] = lrs
        out.append(record)
    return out


def trainer_segments(dirs: list[str]) -> tuple[list[Segment], list[dict[str, Any]]]:
    """Segments from Trainer output directories (stages in order), and what each stage recorded."""
    segments: list[Segment] = []
    stages: list[dict[str, Any]] = []
    offset = 0
    for index, d in enumerate(dirs):
        checkpoints, lrs, notes = stage_schedule(Path(d))
        final = len(lrs)
        for i, (step, path) in enumerate(checkpoints):
            # step k's middle is k - 1/2: it is nearer checkpoint i than i + 1 when k <= (c_i + c_{i+1} + 1) / 2
            lo = 1 if i == 0 else math.floor((checkpoints[i - 1][0] + step + 1) / 2) + 1
            hi = final if i == len(checkpoints) - 1 else math.floor((step + checkpoints[i + 1][0] + 1) / 2)
            seg = Segment(str(path), lrs[lo - 1 : hi], first_step=offset + lo, stage=index)
            seg.notes["checkpoint_step"] = offset + step
            segments.append(seg)
        stages.append({"directory": str(d), "steps": final, "first_step": offset + 1, **notes})
        offset += final
    return segments, stages


def stage_rows(specs: list[str], stages: int, num_docs: int) -> list[np.ndarray] | None:
    """The dataset rows of each stage from --stage_rows ("START:END" per --segments directory), or
    None when every stage trained on every row."""
    if not specs:
        return None
    if len(specs) != stages:
        raise BergsonError(
            f"--stage_rows: {len(specs)} ranges for {stages} --segments directories; give one START:END per stage"
        )
    out = []
    for spec in specs:
        parts = spec.split(":")
        try:
            if len(parts) != 2:
                raise ValueError
            start = int(parts[0]) if parts[0].strip() else 0
            end = int(parts[1]) if parts[1].strip() else num_docs
        except ValueError:
            raise BergsonError(
                f"--stage_rows {spec!r}: write each range as START:END (row numbers of --dataset, END exclusive)"
            ) from None
        if not 0 <= start < end <= num_docs:
            raise BergsonError(
                f"--stage_rows {spec!r}: the range must lie within the {num_docs} rows of --dataset and hold at "
                "least one row"
            )
        out.append(np.arange(start, end))
    return out
