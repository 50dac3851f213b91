"""``--token_batch_size auto``: the largest token budget a batch can have on this device.

* On a GPU, by a short probe: one forward and reverse pass through the model (with the gradient
  hooks of a build open, and its loss by the build's route) on a batch of random tokens of the
  budget being tried, the longest documents the model takes; a CUDA out-of-memory error halves
  the budget and tries again, down to :data:`FLOOR`. The first budget that runs is the answer.
* On a CPU, by a rule from memory: a budget whose activations (about ``4 * (3 * vocab + 16 *
  hidden * layers)`` bytes a token in float32: logits, their log-softmax and its gradient, and
  some sixteen hidden-width tensors a layer kept for the reverse pass) fill at most a quarter of
  the memory available now, rounded down to a power of two and kept within ``[FLOOR, CPU_CAP]``.
  A pass whose loss takes the fused output head (:mod:`bergson.collect.head_loss`) makes none of
  the logits' tensors, so there the rule errs on the safe side. Larger batches buy a CPU nothing
  (its matrix products are already efficient at a few thousand rows), so the cap is modest.

The choice is announced on the console and recorded in the store's manifest
(``plan.token_batch_size_auto``); the budget is then used as if it had been given.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import BergsonError

logger = logging.getLogger(__name__)

AUTO = "auto"
FLOOR = 256
"""The smallest budget ``auto`` picks (a GPU on which even this does not fit fails with a message)."""
CPU_CAP = 8192
"""The largest budget the CPU rule picks."""
GPU_START = 65536
"""The first budget the GPU probe tries."""
MEMORY_SHARE = 0.25
"""The share of the available memory the CPU rule lets a batch's activations take."""


def is_auto(value: Any) -> bool:
    """Whether a ``token_batch_size`` value asks for the automatic budget."""
    return isinstance(value, str) and value.strip().lower() == AUTO


def _pow2_floor(n: float) -> int:
    return 1 << max(int(n), 1).bit_length() - 1


def _config_int(model: nn.Module, *keys: str) -> int | None:
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def bytes_per_token(model: nn.Module) -> int:
    """The CPU rule's estimate of a batch's activation bytes per token (see the module docstring)."""
    vocab = _config_int(model, "vocab_size") or 32000
    hidden = _config_int(model, "hidden_size", "n_embd", "d_model") or 1024
    layers = _config_int(model, "num_hidden_layers", "n_layer", "num_layers") or 12
    return 4 * (3 * vocab + 16 * hidden * layers)


def available_memory() -> int:
    """Bytes of memory available to this process now (MemAvailable; total memory as a fallback)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cpu_token_budget(model: nn.Module, available: int | None = None) -> tuple[int, dict[str, Any]]:
    """The CPU rule: (budget, what it was computed from)."""
    per_token = bytes_per_token(model)
    avail = available_memory() if available is None else available
    raw = MEMORY_SHARE * avail / per_token
    budget = min(CPU_CAP, max(FLOOR, _pow2_floor(raw)))
    return budget, {
        "method": "cpu memory rule",
        "available_memory_bytes": int(avail),
        "estimated_bytes_per_token": per_token,
        "rule": f"largest power of two <= {MEMORY_SHARE} x available / bytes per token, within [{FLOOR}, {CPU_CAP}]",
    }


def is_oom(error: BaseException) -> bool:
    """Whether ``error`` is a device out-of-memory error."""
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(error, oom) or (isinstance(error, RuntimeError) and "out of memory" in str(error))


def probe_budget(
    step: Callable[[int], None],
    start: int = GPU_START,
    floor: int = FLOOR,
    after_oom: Callable[[], None] | None = None,
) -> tuple[int, list[dict[str, Any]]]:
    """Run ``step(budget)`` from ``start``, halving after each out-of-memory error, until one runs:
    (that budget, the attempts). Any other error propagates; ``after_oom`` (freeing the device's
    cache) runs after each failure. Below ``floor`` it gives up with a :class:`BergsonError`."""
    tries: list[dict[str, Any]] = []
    budget = start
    while budget >= floor:
        try:
            step(budget)
        except Exception as e:  # only OOM is handled; others re-raise
            if not is_oom(e):
                raise
            tries.append({"budget": budget, "fits": False})
            if after_oom is not None:
                after_oom()
            budget //= 2
            continue
        tries.append({"budget": budget, "fits": True})
        return budget, tries
    raise BergsonError(
        f"--token_batch_size auto: even {floor} tokens per batch ran out of device memory; "
        "free memory on the device, use a smaller model or precision, or give --token_batch_size explicitly"
    )


def _probe_step(
    model: nn.Module, modules: Any, projection_dim: int, context: int | None
) -> Callable[[int], None]:
    """One build-like step on random tokens: ``budget // length`` documents of ``length`` tokens."""
    from .engine import PassEngine
    from .head_loss import document_losses
    from .hooks import GradientCollector
    from .losses import next_tokens, token_losses

    device = next(model.parameters()).device
    vocab = _config_int(model, "vocab_size") or 2

    def loss_fn(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:  # the build's own route to the loss
        target = next_tokens(ids)
        return document_losses(m, ids, target, "sum", lambda logits: token_losses(logits, target).sum(1))

    def step(budget: int) -> None:
        length = min(budget, context) if context else budget
        ids = torch.randint(0, vocab, (max(budget // length, 1), length), device=device)
        hooks = GradientCollector(model, modules, projection_dim=projection_dim, closure=lambda _n, _v: None)
        PassEngine(model, loss_fn, progress=False).run([ids], hooks=hooks)

    return step


def auto_token_budget(
    model: nn.Module,
    *,
    modules: Any = None,
    projection_dim: int = 16,
    context: int | None = None,
    step: Callable[[int], None] | None = None,
) -> tuple[int, dict[str, Any]]:
    """The budget ``--token_batch_size auto`` stands for on the model's device, and the record of
    how it was chosen (for the manifest). ``step`` replaces the GPU probe's step (tests)."""
    device = next(model.parameters()).device
    if device.type != "cuda" and step is None:
        budget, record = cpu_token_budget(model)
    else:

        def free() -> None:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

        budget, tries = probe_budget(
            step or _probe_step(model, modules, projection_dim, context), after_oom=free
        )
        free()
        record = {
            "method": "device probe (forward + reverse pass on random tokens, halving on out-of-memory)",
            "tries": tries,
        }
    record = {"chosen": budget, "device": str(device), **record}
    logger.info("--token_batch_size auto: %d tokens per batch (%s)", budget, record["method"])
    return budget, record
