"""The pass engine: the one loop that runs batches through a model with a loss and hooks.

Every method that needs gradients of the training data (building and scoring stores,
preconditioner statistics, EK-FAC's passes, the custom-model API) is this loop with
different hooks and a different consumer of each batch:

    for batch in batches:
        losses = loss_fn(model, batch)        # one loss per example, [B]
        differentiate losses.sum()            # the hooks see every tracked layer's x and g
        on_batch(batch, losses)               # hand the hooks' results to a sink

The model's ``requires_grad`` flags are switched off for the pass (and restored after it):
the hooks start autograd at the first tracked layer, so no weight gradient is computed and
no ``param.grad`` is written. Gradients are enabled for the pass even inside ``no_grad``.

A model sharded with FSDP gathers each layer's weights collectively, so every rank must
run every step: with an ``idle_loss``, a rank with fewer batches than another runs idle
steps (``idle_loss(model)``, a throwaway scalar) until every rank has had as many steps
(:func:`bergson.distributed.lockstep`). During an idle step :attr:`PassEngine.batch` is
None, so hooks can tell it apart from a real batch.

MAGIC's differentiable replay of a training run is the one other loop of the library.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sized
from contextlib import AbstractContextManager
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..errors import BergsonError

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], torch.Tensor]
"""``loss_fn(model, batch) -> losses [B]``: one loss per example of the batch."""

OnBatch = Callable[[Any, torch.Tensor], None]
"""``on_batch(batch, losses)``, called after each batch's reverse pass with its detached losses."""


def token_shape(batch: Any) -> tuple[int, int] | None:
    """The ``(batch, seq)`` of a batch's token ids (a :class:`~bergson.collect.losses.DocumentBatch`'s
    ``ids``, or a mapping's ``input_ids``), None when the batch has no 2-D ids. The hooks use it
    to map the rows of layers called on flattened tokens back to documents."""
    ids = getattr(batch, "ids", None)
    if ids is None and isinstance(batch, Mapping):
        ids = batch.get("input_ids")
    if isinstance(ids, torch.Tensor) and ids.ndim == 2:
        return int(ids.shape[0]), int(ids.shape[1])
    return None


def check_losses(losses: Any) -> torch.Tensor:
    """``losses`` if it is one loss per example (a 1-D tensor); a :class:`BergsonError` otherwise."""
    if not isinstance(losses, torch.Tensor) or losses.ndim != 1:
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise BergsonError(
            f"loss_fn must return one loss per example (a 1-D tensor [B]), got {shape}; "
            "use reduction='none' and sum over any other axis"
        )
    return losses


@dataclass(eq=False)
class PassEngine:
    """Runs passes over batches: ``loss_fn(model, batch)`` forward, the reverse pass of the
    summed per-example losses with hooks open, ``on_batch`` after each batch.

    ``size(batch)`` is what a batch adds to the progress bar (in ``unit``; default one per
    batch), whose rate is the throughput. ``idle_loss`` (see the module docstring) makes a
    sharded model's ranks run in lockstep. ``shape(batch)`` is the batch's ``(batch, seq)``
    (default :func:`token_shape`), handed to hooks that have a ``batch_shape`` attribute (the
    gradient hooks) before each forward, so that layers called on flattened tokens stay exact.

    While a batch is in flight, :attr:`batch` is that batch (None during an idle step) and
    :attr:`seen` the number of examples of the pass before it.
    """

    model: nn.Module = field(repr=False)
    loss_fn: LossFn
    _: KW_ONLY
    idle_loss: Callable[[nn.Module], torch.Tensor] | None = None
    size: Callable[[Any], int] | None = None
    shape: Callable[[Any], tuple[int, int] | None] = token_shape
    unit: str = "batch"
    desc: str = "pass"
    progress: bool = True
    batch: Any = field(default=None, init=False)
    seen: int = field(default=0, init=False)

    def _idle_steps(self, batches: Iterable[Any], steps: int | None) -> int:
        if self.idle_loss is None:
            return 0
        if steps is None:
            if not isinstance(batches, Sized):
                raise TypeError("a pass in lockstep needs its number of steps (steps=) up front")
            steps = len(batches)
        return distributed.lockstep(self.model, steps) - steps

    @staticmethod
    def _tell_shape(hooks: Any, shape: tuple[int, int] | None) -> None:
        if hasattr(hooks, "batch_shape"):
            hooks.batch_shape = shape

    def run(
        self,
        batches: Iterable[Any],
        *,
        hooks: AbstractContextManager[Any] | None = None,
        on_batch: OnBatch | None = None,
        steps: int | None = None,
        total: int | None = None,
        desc: str | None = None,
    ) -> int:
        """One pass over ``batches`` with ``hooks`` open; returns the number of examples.

        ``steps`` is the number of batches (needed up front in lockstep when ``batches`` has no
        length), ``total`` the progress bar's total (in ``unit``), ``desc`` its label."""
        model = self.model
        idle = self._idle_steps(batches, steps)
        saved = {p: p.requires_grad for p in model.parameters()}
        model.requires_grad_(False)
        self.seen = 0
        bar = tqdm(
            total=total,
            unit=self.unit,
            unit_scale=True,
            desc=desc or self.desc,
            disable=not self.progress,
        )
        try:
            with hooks if hooks is not None else contextlib.nullcontext(), torch.enable_grad():
                for batch in batches:
                    self.batch = batch
                    self._tell_shape(hooks, self.shape(batch))
                    losses = check_losses(self.loss_fn(model, batch))
                    losses.sum().backward()
                    if on_batch is not None:
                        on_batch(batch, losses.detach())
                    self.seen += losses.shape[0]
                    bar.update(1 if self.size is None else self.size(batch))
                self.batch = None
                self._tell_shape(hooks, None)
                if idle:
                    assert self.idle_loss is not None
                    logger.debug("%d idle steps to keep the ranks of a sharded model in step", idle)
                for _ in range(idle):
                    self.idle_loss(model).backward()  # type: ignore[misc]
        finally:
            self.batch = None
            self._tell_shape(hooks, None)
            bar.close()
            for p, flag in saved.items():
                p.requires_grad_(flag)
        return self.seen
