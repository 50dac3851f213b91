"""Hooks that turn activations and output gradients into per-example gradients.

For a linear layer y = x W^T + b with W of shape (out x in), the gradient of document
n's loss is G_n = sum_t g_{n,t} x_{n,t}^T, with x the layer input and g the gradient of
the loss with respect to the layer output. With a projection size p > 0 we store
vec(L G_n R^T) = vec(sum_t (L g_t)(R x_t)^T), flattened row-major, which never forms the
out x in matrix. With p = 0 we store G_n flattened in the parameter's own layout (the
order of ``weight.grad.flatten()``), the bias gradient last when included.

Weight gradients are never needed: a forward hook marks each tracked layer's output as
requiring grad, so autograd only propagates through activations, starting at the first
tracked layer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from ..transforms.normalizers import AdafactorNormalizer, AdamNormalizer, Normalizer
from ..transforms.projection import projection_matrix

Closure = Callable[[str, torch.Tensor], None]


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def module_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a tracked layer."""
    if _is_conv1d(module):
        weight: torch.Tensor = module.weight  # type: ignore[assignment]
        return int(weight.shape[1]), int(weight.shape[0])
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    raise TypeError(f"unsupported layer type {type(module).__name__}")


def module_dims(module: nn.Module, projection_dim: int, include_bias: bool) -> int:
    """Length of one module's stored vector."""
    out, n_in = module_shape(module)
    if projection_dim > 0:
        return projection_dim * projection_dim
    has_bias = include_bias and getattr(module, "bias", None) is not None
    return out * n_in + (out if has_bias else 0)


class GradientCollector:
    """Collect per-example (projected) gradients of tracked layers during backward.

    Use as a context manager around the forward and backward passes::

        with GradientCollector(model, projection_dim=16) as collector:
            loss = per_document_loss(model(ids).logits, labels).sum()
            loss.backward()
        grads = collector.gradients  # {module name: [batch, dim]}

    With ``closure=fn``, ``fn(module_name, grads)`` is called for each tracked module
    as soon as its per-example gradients ([batch, dim]) are ready during the backward
    pass, and nothing is kept. The batch's loss must be a sum of per-example losses.

    ``normalizers`` maps module names to an :class:`AdafactorNormalizer` (applied as row and
    column scales before projection) or an :class:`AdamNormalizer` (applied to the full
    per-example gradient, which is then projected). Normalizer shapes are in the
    ``(out, in)`` convention of ``nn.Linear`` for every layer type.
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Mapping[str, nn.Module] | Sequence[str] | None = None,
        *,
        projection_dim: int = 16,
        seed: int = 0,
        include_bias: bool = False,
        normalizers: Mapping[str, Normalizer] | None = None,
        closure: Closure | None = None,
    ):
        from ..models import find_tracked_modules

        if modules is None:
            modules = find_tracked_modules(model)
        elif not isinstance(modules, Mapping):
            named = dict(model.named_modules())
            missing = [m for m in modules if m not in named]
            if missing:
                raise KeyError(f"no module named {missing[0]!r} in the model")
            modules = {m: named[m] for m in modules}
        if projection_dim < 0:
            raise ValueError("projection_dim must be >= 0")
        self.model = model
        self.modules: dict[str, nn.Module] = dict(modules)
        self.projection_dim = projection_dim
        self.seed = seed
        self.include_bias = include_bias
        self.normalizers: dict[str, Normalizer] = dict(normalizers or {})
        unknown = set(self.normalizers) - set(self.modules)
        if unknown:
            raise KeyError(f"normalizers given for untracked modules: {sorted(unknown)}")
        self.closure = closure
        self._handles: list[Any] = []
        self._inputs: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._grads: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._proj: dict[tuple[str, str, torch.dtype, torch.device], torch.Tensor] = {}

    # ------------------------------------------------------------------ layout
    @property
    def dims(self) -> dict[str, int]:
        """Vector length per tracked module, in tracking order."""
        return {n: module_dims(m, self.projection_dim, self.include_bias) for n, m in self.modules.items()}

    def _has_bias(self, module: nn.Module) -> bool:
        return self.include_bias and getattr(module, "bias", None) is not None

    # ------------------------------------------------------------------ context
    def __enter__(self) -> GradientCollector:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(partial(self._forward_hook, name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._inputs.clear()

    @property
    def gradients(self) -> dict[str, torch.Tensor]:
        """Per-example gradients collected so far (without a closure), concatenated over batches."""
        return {n: torch.cat(v) if len(v) > 1 else v[0] for n, v in self._grads.items() if v}

    def reset(self) -> None:
        """Forget collected gradients."""
        self._grads.clear()

    # ------------------------------------------------------------------ hooks
    def _forward_hook(self, name: str, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
            return
        if not output.requires_grad:
            # Start autograd here instead of at the embeddings: no weight gradients needed.
            output.requires_grad_(True)
        self._inputs[name].append(inputs[0].detach())
        output.register_hook(partial(self._backward_hook, name))

    def _backward_hook(self, name: str, grad: torch.Tensor) -> None:
        x = self._inputs[name].pop()
        vec = self.per_example(name, x, grad)
        if self.closure is not None:
            self.closure(name, vec)
        else:
            self._grads[name].append(vec)

    # ------------------------------------------------------------------ math
    def _matrix(self, name: str, side: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (name, side, dtype, device)
        mat = self._proj.get(key)
        if mat is None or mat.shape[1] != n:
            mat = projection_matrix(self.seed, name, side, self.projection_dim, n, dtype=dtype, device=device)  # type: ignore[arg-type]
            self._proj[key] = mat
        return mat

    def per_example(self, name: str, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Per-example vectors [B, dim] of module ``name`` from inputs x and output grads g."""
        module = self.modules[name]
        out, n_in = module_shape(module)
        batch = g.shape[0]
        cdt = torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else g.dtype
        x = x.reshape(batch, -1, n_in).to(cdt)
        g = g.reshape(batch, -1, out).to(cdt)
        bias = self._has_bias(module)
        if bias:
            x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
        norm = self.normalizers.get(name)
        if isinstance(norm, AdafactorNormalizer):
            a, b = norm.scales(bias)
            g = g * a.to(g)
            x = x * b.to(x)
        p = self.projection_dim
        if p > 0 and not isinstance(norm, AdamNormalizer):
            left = self._matrix(name, "left", out, cdt, g.device)
            right = self._matrix(name, "right", x.shape[-1], cdt, x.device)
            return (g @ left.T).mT.bmm(x @ right.T).reshape(batch, p * p)

        full = g.mT.bmm(x)  # [B, out, in(+1)]
        if isinstance(norm, AdamNormalizer):
            w, b_ = norm.apply(full[..., :n_in], full[..., n_in] if bias else None)
            full = torch.cat([w, b_.unsqueeze(-1)], dim=-1) if b_ is not None else w
        if p > 0:
            left = self._matrix(name, "left", out, cdt, g.device)
            right = self._matrix(name, "right", full.shape[-1], cdt, g.device)
            return (left @ full @ right.T).reshape(batch, p * p)
        weight = full[..., :n_in]
        if _is_conv1d(module):
            weight = weight.mT  # Conv1D stores its weight as (in, out)
        flat = weight.reshape(batch, -1)
        if bias:
            flat = torch.cat([flat, full[..., n_in]], dim=-1)
        return flat
