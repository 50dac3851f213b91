"""Batch recording: which dataset rows each of the trainer's micro-batches holds, and its
rows' hooked vectors and loss scale.

The train dataloader's batch sampler is made to report every batch of row indices it hands
out (:func:`record_batches`); a :class:`BatchRecorder` hooks the model so that each training
forward pass opens a :class:`~bergson.integrations.loss_scale.MicroBatch` for the next
reported batch, the output layer's logits (or, from a fused LM head such as TRL's
``SFTTrainer`` adds, the labels' log-probabilities) measure its loss scale, and the gradient
collector's closure fills its vectors.
"""

from __future__ import annotations

import time
from collections import deque
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from ..collect.losses import next_tokens
from ..core.experts import ExpertLinear
from .checks import callback_error, check_batch, output_layer
from .loss_scale import MicroBatch


class Stopwatch:
    """Adds the seconds spent inside every outermost ``with`` block to :attr:`seconds`."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._starts: list[float] = []

    def __enter__(self) -> Stopwatch:
        self._starts.append(time.perf_counter())
        return self

    def __exit__(self, *exc: Any) -> None:
        start = self._starts.pop()
        if not self._starts:
            self.seconds += time.perf_counter() - start


_RECORDING: dict[type, type] = {}


def _recording_class(cls: type) -> type:
    """A subclass of a batch sampler class that appends every batch it yields to a queue."""
    rec = _RECORDING.get(cls)
    if rec is None:

        def __iter__(self: Any) -> Any:
            for batch in cls.__iter__(self):  # type: ignore[attr-defined]
                queue = getattr(self, "_bergson_batches", None)
                if queue is not None:
                    queue.append(list(batch))
                yield batch

        rec = type(cls.__name__, (cls,), {"__iter__": __iter__, "_bergson_recording": True})
        rec.__module__ = cls.__module__
        _RECORDING[cls] = rec
    return rec


def record_batches(dataloader: Any, queue: deque[list[int]] | None) -> Any:
    """Make the batch sampler of a (possibly accelerate-prepared) dataloader report its batches
    to ``queue`` (None: stop reporting). Returns the sampler.

    The sampler runs in the main process whatever the number of workers, and batches come out of
    the dataloader in the order the sampler made them; accelerate iterates one batch ahead and the
    trainer prefetches a step's micro-batches, so batches are matched first in, first out. The
    sampler object keeps its class (seen through ``isinstance``) and its state.
    """
    base = getattr(dataloader, "base_dataloader", dataloader)
    if isinstance(getattr(base, "dataset", None), torch.utils.data.IterableDataset):
        raise callback_error(
            "the train dataloader reads an iterable dataset, whose rows have no index; use a map-style dataset"
        )
    sampler = getattr(base, "batch_sampler", None)
    if sampler is None:
        raise callback_error(
            "the train dataloader has no batch sampler, so the dataset rows of each batch cannot be known; "
            "build it with a batch size (not batch_size=None)"
        )
    if not getattr(type(sampler), "_bergson_recording", False):
        sampler.__class__ = _recording_class(type(sampler))
    sampler._bergson_batches = queue
    return sampler


class BatchRecorder:
    """Hooks on the trainer's model that turn each training forward and backward pass of an
    open step into a :class:`MicroBatch`.

    The seconds the hooks take are added to ``watch``. Between :meth:`open_step` and
    :meth:`close_step` every training forward pass takes the next batch the sampler reported;
    :meth:`take` hands over the micro-batch once its backward pass is done.
    """

    def __init__(self, watch: Stopwatch):
        self.watch = watch
        self.columns: dict[str, tuple[int, int]] = {}
        self.width = 0
        self.batches: deque[list[int]] = deque()
        self.pending: MicroBatch | None = None
        self._sampler: Any = None
        self._handles: list[Any] = []
        self._open = False
        self._step = 0
        self._micro = 0
        self._normalized = False
        self._tracked_head: list[str] = []
        self._body = "model"
        self._routed: set[str] = set()

    def attach(
        self,
        model: nn.Module,
        dataloader: Any,
        columns: dict[str, tuple[int, int]],
        tracked: dict[str, nn.Module] | None = None,
    ) -> None:
        """Start recording the batches of ``dataloader`` and hooking ``model``'s passes
        (``tracked``: the collector's modules, named when a forward pass bypasses them)."""
        self.columns = columns
        self.width = sum(b - a for a, b in columns.values())
        # a routed expert may get no token of a micro-batch: its zero columns are right, not a fault
        self._routed = {
            n for n, m in (tracked or {}).items() if isinstance(m, ExpertLinear) and m.index is not None
        }
        self._sampler = record_batches(dataloader, self.batches)
        head = output_layer(model)
        self._tracked_head = [n for n, m in (tracked or {}).items() if m is head]
        self._body = getattr(model, "base_model_prefix", "") or "model"
        self._handles = [
            model.register_forward_pre_hook(self._on_model_forward, with_kwargs=True),
            model.register_forward_hook(self._on_model_output),
            head.register_forward_hook(self._on_logits),
        ]

    def detach(self) -> None:
        """Remove the hooks and stop the sampler's reports (again: nothing)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.batches.clear()
        self.pending = None
        self._open = False
        if self._sampler is not None:
            self._sampler._bergson_batches = None
            self._sampler = None

    def open_step(self, step: int, normalized: bool) -> None:
        """Record the micro-batches of optimizer step ``step`` (``normalized``: its vectors are)."""
        self._open = True
        self._step = step
        self._micro = 0
        self._normalized = normalized

    def close_step(self) -> None:
        """Stop recording until the next :meth:`open_step`."""
        self._open = False

    def take(self) -> MicroBatch | None:
        """The micro-batch whose passes ran since the last call, if any. Raises when a tracked
        module got no gradient in a micro-batch with labels (its forward never ran, or its output
        does not reach the loss): its columns would silently stay zero."""
        mb, self.pending = self.pending, None
        if mb is not None and mb.has_targets is not None and bool(mb.has_targets.any()):
            missing = [name for name in self.columns if name not in mb.filled and name not in self._routed]
            if missing:
                raise callback_error(
                    f"no gradient reached the tracked module(s) {', '.join(missing)} in the trainer's backward "
                    "pass (their forward never ran, or their output does not reach the loss), so their columns "
                    "would stay zero; leave them out of the callback's modules="
                )
        return mb

    def closure(self, name: str, vec: torch.Tensor) -> None:
        """The gradient collector's closure: module ``name``'s [B, dim] vectors of the micro-batch."""
        mb = self.pending
        if mb is None:
            raise callback_error(
                "a backward pass ran outside a training micro-batch; run backward passes of your own outside "
                "trainer.train()"
            )
        a, b = self.columns[name]
        mb.buffer[:, a:b] += vec
        mb.filled.add(name)

    def _on_model_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self._open or not torch.is_grad_enabled() or not module.training:
            return
        with self.watch:
            if self.pending is not None:
                raise callback_error(
                    "a second training forward pass began before the previous micro-batch's backward pass "
                    "ended; only one forward and backward per micro-batch is supported"
                )
            labels = check_batch(kwargs)
            self.pending = self._micro_batch(module, labels, kwargs)
            self._micro += 1

    def _micro_batch(self, module: nn.Module, labels: torch.Tensor, kwargs: dict[str, Any]) -> MicroBatch:
        if not self.batches:
            raise callback_error(
                "a training batch arrived that the train dataloader's sampler did not hand out, so its dataset "
                "rows are unknown (a custom get_train_dataloader or iterator?); use the Trainer's own dataloader"
            )
        try:
            rows = np.asarray(self.batches.popleft(), dtype=np.int64)
        except (TypeError, ValueError) as e:
            raise callback_error(
                "the sampler's indices are not row numbers; the train sampler must yield integer row indices"
            ) from e
        if len(rows) != labels.shape[0]:
            raise callback_error(
                f"the sampler handed out {len(rows)} rows but the batch has {labels.shape[0]}; the data "
                "collator must keep one sequence per dataset row, in order"
            )
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.shape == labels.shape:
            num_tokens = mask.sum(1).cpu().numpy().astype(np.int64)
        else:
            num_tokens = np.full(len(rows), labels.shape[1], np.int64)
        input_ids = kwargs.get("input_ids")
        dtype = torch.float64 if next(module.parameters()).dtype == torch.float64 else torch.float32
        return MicroBatch(
            rows=rows,
            step=self._step,
            index=self._micro,
            normalized=self._normalized,
            buffer=torch.zeros(len(rows), self.width, dtype=dtype, device=labels.device),
            targets=next_tokens(labels.detach()),
            num_tokens=num_tokens,
            inputs=input_ids.detach() if isinstance(input_ids, torch.Tensor) else None,
        )

    def _on_logits(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        mb = self.pending
        if mb is None or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
            return
        if mb.forward_done:
            raise callback_error(
                "the output layer ran twice in one forward pass; the model must compute its logits once per "
                "training forward pass"
            )
        with self.watch:
            mb.probe_forward(output)
            if not output.requires_grad:
                output.requires_grad_(True)
            output.register_hook(partial(self._on_logits_grad, mb))

    def _on_model_output(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        """A fused LM head's output (per-token ``log_probs`` and ``label_mask`` instead of logits,
        the output layer never called): measure the loss scale from the log-probabilities."""
        mb = self.pending
        log_probs = getattr(output, "log_probs", None)
        label_mask = getattr(output, "label_mask", None)
        if mb is None or mb.forward_done or not isinstance(log_probs, torch.Tensor):
            return
        if not isinstance(label_mask, torch.Tensor) or not log_probs.requires_grad:
            return
        with self.watch:
            if self._tracked_head:
                raise callback_error(
                    f"the model computed its loss through a fused LM head (TRL's SFTTrainer does: it multiplies "
                    f"the hidden states by the output layer's weight in chunks and never calls the layer), so the "
                    f"tracked output layer {self._tracked_head[0]!r} gets no per-example gradient; leave it out "
                    f"(drop include_output_head=True and the head from modules=; the default, like "
                    f"modules=['{self._body}.*'], tracks the layers of the transformer body)"
                )
            mb.fused_forward(log_probs, label_mask)
            log_probs.register_hook(partial(self._on_log_probs_grad, mb, label_mask))

    def _on_log_probs_grad(self, mb: MicroBatch, label_mask: torch.Tensor, grad: torch.Tensor) -> None:
        with self.watch:
            mb.fused_backward(label_mask, grad)

    def _on_logits_grad(self, mb: MicroBatch, grad: torch.Tensor) -> None:
        with self.watch:
            mb.probe_backward(grad)
