"""Per-example gradients of any PyTorch model and loss, not only causal language models.

The document loop (:func:`bergson.collect.loop.collect_gradients`) tokenizes text and
computes a next-token loss. Here the caller brings both halves instead: an iterable of
batches in whatever form the model takes, and ``loss_fn(model, batch)`` returning the
per-example losses [B]. The same :class:`~bergson.collect.hooks.GradientCollector` hooks
turn each tracked layer's inputs and output gradients into per-example (projected,
optionally optimizer-normalized) gradient vectors. Layer inputs may be [B, in] (a
classifier) or [B, T, in] (a sequence model; positions are summed per example). Both loops
are passes of the one pass engine (:class:`~bergson.collect.engine.PassEngine`).

Example, a logistic regression on features ``x`` with labels ``y``::

    model = torch.nn.Linear(64, 10)
    batches = [(x[i : i + 256], y[i : i + 256]) for i in range(0, len(x), 256)]

    def loss_fn(model, batch):
        inputs, labels = batch
        return torch.nn.functional.cross_entropy(model(inputs), labels, reduction="none")

    grads = per_example_gradients(model, batches, loss_fn, projection_dim=0)
    grads.vectors  # [N, 10 * 64]: row n is example n's weight gradient, flattened
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.layout import ModuleLayout
from ..errors import BergsonError
from ..transforms.normalizers import Normalizer
from .engine import LossFn, PassEngine
from .hooks import GradientCollector, LayerTap, TapFn
from .loop import finish_rows

__all__ = ["ExampleGradients", "LossFn", "per_example_gradients", "tap_batches"]


@dataclass
class ExampleGradients:
    """Per-example gradient vectors: ``vectors`` [N, D] (row n is the n-th example seen), the
    column blocks ``layouts`` (one per tracked module, in column order) and each example's loss."""

    vectors: torch.Tensor
    layouts: list[ModuleLayout]
    losses: torch.Tensor

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def by_module(self) -> dict[str, torch.Tensor]:
        """The columns of each module, [N, dim] per module name."""
        return {m.name: self.vectors[:, m.offset : m.offset + m.dim] for m in self.layouts}


def per_example_gradients(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossFn,
    *,
    modules: Mapping[str, nn.Module] | Sequence[str] | None = None,
    projection_dim: int = 16,
    seed: int = 0,
    include_bias: bool = False,
    normalizers: Mapping[str, Normalizer] | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    unit_normalize: bool = False,
    progress: bool = True,
) -> ExampleGradients:
    """The per-example gradient of ``loss_fn`` at every example of ``batches``, one row each.

    ``modules`` are the tracked layers (names or a name → module mapping; default: those
    :func:`bergson.models.find_tracked_modules` finds: every ``nn.Linear`` of a model without a
    ``base_model``, the body's of a Hugging Face model). ``projection_dim`` p > 0 stores
    vec(L G Rᵀ) (p² numbers per module, with the library's seeded matrices, so vectors of
    separate calls are comparable); p = 0 stores the exact gradient in the weight's own layout (bias last with ``include_bias``).
    ``normalizers`` (per module) divide by an optimizer's second moment first, as in
    :class:`~bergson.collect.hooks.GradientCollector`. ``transform`` maps each batch's
    [B, D] vectors (e.g. a preconditioner's :meth:`~bergson.Preconditioner.transform`),
    before ``unit_normalize`` scales each row to norm 1.

    Computed in the model's dtype (float32 for half precision). The model's ``requires_grad``
    flags are restored afterwards and no ``param.grad`` is written.
    """
    collector = GradientCollector(
        model,
        modules,
        projection_dim=projection_dim,
        seed=seed,
        include_bias=include_bias,
        normalizers=normalizers,
    )
    layouts = collector.layouts
    dtype = next(model.parameters()).dtype
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    rows: list[torch.Tensor] = []
    losses: list[torch.Tensor] = []

    def keep(batch: Any, batch_losses: torch.Tensor) -> None:
        grads = collector.gradients
        collector.reset()
        vec, _ = finish_rows(
            torch.cat([grads[m.name].to(cdt) for m in layouts], 1), transform, unit_normalize
        )
        rows.append(vec.detach().cpu())
        losses.append(batch_losses.to(cdt).cpu())

    PassEngine(model, loss_fn, desc="gradients", progress=progress).run(
        batches, hooks=collector, on_batch=keep
    )
    if not rows:
        raise BergsonError("batches is empty: there are no examples to compute gradients of")
    return ExampleGradients(torch.cat(rows), layouts, torch.cat(losses))


def tap_batches(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossFn,
    modules: Mapping[str, nn.Module],
    fn: TapFn,
    *,
    include_bias: bool = False,
    desc: str = "pass",
    progress: bool = True,
) -> int:
    """One pass of the engine over ``batches`` handing every tracked layer's inputs x
    [B, T, in] and output gradients g [B, T, out] to ``fn(name, x, g)`` (T = 1 for inputs
    without a sequence axis). Returns the number of examples seen."""
    engine = PassEngine(model, loss_fn, desc=desc, progress=progress)
    return engine.run(batches, hooks=LayerTap(modules, fn, include_bias))
