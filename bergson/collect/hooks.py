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


class _LayerHooks:
    """Forward hooks on every tracked layer while the context is open; subclasses define
    ``_forward_hook(name, module, inputs, output)`` and keep layer inputs in ``_inputs``."""

    modules: dict[str, nn.Module]

    def __init__(self) -> None:
        self._handles: list[Any] = []
        self._inputs: dict[str, list[torch.Tensor]] = defaultdict(list)

    def _forward_hook(self, name: str, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(partial(self._forward_hook, name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._inputs.clear()


class GradientCollector(_LayerHooks):
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
        super().__init__()
        self._grads: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._proj: dict[tuple[str, str, torch.dtype, torch.device], torch.Tensor] = {}
        self._scaled: dict[tuple[str, str, torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ layout
    @property
    def dims(self) -> dict[str, int]:
        """Vector length per tracked module, in tracking order."""
        return {n: module_dims(m, self.projection_dim, self.include_bias) for n, m in self.modules.items()}

    def _has_bias(self, module: nn.Module) -> bool:
        return self.include_bias and getattr(module, "bias", None) is not None

    # ------------------------------------------------------------------ context
    def __enter__(self) -> GradientCollector:
        return super().__enter__()

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
        x = inputs[0].detach()
        # On the projected path only R x is kept, so the layer input can be freed early.
        self._inputs[name].append(self.project_inputs(name, x) if self._cheap_path(name) else x)
        output.register_hook(partial(self._backward_hook, name))

    def _backward_hook(self, name: str, grad: torch.Tensor) -> None:
        saved = self._inputs[name].pop()
        if self._cheap_path(name):
            vec = self.from_projected(name, saved, grad)
        else:
            vec = self.full_gradient(name, saved, grad)
        if self.closure is not None:
            self.closure(name, vec)
        else:
            self._grads[name].append(vec)

    # ------------------------------------------------------------------ math
    def _cheap_path(self, name: str) -> bool:
        """Projection without an elementwise (Adam) normalizer: never form the full gradient."""
        return self.projection_dim > 0 and not isinstance(self.normalizers.get(name), AdamNormalizer)

    @staticmethod
    def _compute_dtype(t: torch.Tensor) -> torch.dtype:
        return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype

    def _matrix(self, name: str, side: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (name, side, dtype, device)
        mat = self._proj.get(key)
        if mat is None:
            mat = projection_matrix(self.seed, name, side, self.projection_dim, n, dtype=dtype, device=device)  # type: ignore[arg-type]
            self._proj[key] = mat
        return mat

    def _scaled_matrices(
        self, name: str, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """L (p x out) and R (p x in[+1]) with an Adafactor normalizer's row and column
        scales folded in, so that L diag(a) G diag(b) R^T costs no extra pass over G."""
        key = (name, "scaled", dtype, device)
        cached = self._scaled.get(key)
        if cached is not None:
            return cached
        module = self.modules[name]
        out, n_in = module_shape(module)
        n_cols = n_in + int(self._has_bias(module))
        left = self._matrix(name, "left", out, dtype, device)
        right = self._matrix(name, "right", n_cols, dtype, device)
        norm = self.normalizers.get(name)
        if isinstance(norm, AdafactorNormalizer):
            a, b = norm.scales(self._has_bias(module))
            left = left * a.to(device, dtype)
            right = right * b.to(device, dtype)
        self._scaled[key] = (left, right)
        return left, right

    def project_inputs(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """R x for every position: [B, S, p] (the bias column, if any, adds R's last column)."""
        module = self.modules[name]
        _, n_in = module_shape(module)
        cdt = self._compute_dtype(x)
        x = x.reshape(x.shape[0], -1, n_in).to(cdt)
        _, right = self._scaled_matrices(name, cdt, x.device)
        xp = x @ right[:, :n_in].T
        if self._has_bias(module):
            xp = xp + right[:, n_in]
        return xp

    def from_projected(self, name: str, xp: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """vec(sum_t (L g_t)(R x_t)^T) per example: [B, p*p]."""
        out, _ = module_shape(self.modules[name])
        batch = g.shape[0]
        g = g.reshape(batch, -1, out).to(xp.dtype)
        left, _ = self._scaled_matrices(name, xp.dtype, xp.device)
        return (g @ left.T).mT.bmm(xp).reshape(batch, -1)

    def full_gradient(self, name: str, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The per-example gradient formed explicitly (p = 0, or an Adam normalizer), then
        normalized and projected if asked; p = 0 returns the parameter's own layout."""
        module = self.modules[name]
        out, n_in = module_shape(module)
        batch = g.shape[0]
        cdt = self._compute_dtype(g)
        x = x.reshape(batch, -1, n_in).to(cdt)
        g = g.reshape(batch, -1, out).to(cdt)
        bias = self._has_bias(module)
        full = g.mT.bmm(x)  # [B, out, in]
        grad_b = g.sum(1) if bias else None
        norm = self.normalizers.get(name)
        if isinstance(norm, AdafactorNormalizer):
            a, b = norm.scales(bias)
            full = full * a.to(full)[:, None] * b[:n_in].to(full)
            if grad_b is not None:
                grad_b = grad_b * a.to(grad_b) * b[n_in].to(grad_b)
        elif isinstance(norm, AdamNormalizer):
            full, grad_b = norm.apply(full, grad_b)
        p = self.projection_dim
        if p > 0:
            if grad_b is not None:
                full = torch.cat([full, grad_b.unsqueeze(-1)], dim=-1)
            left = self._matrix(name, "left", out, cdt, g.device)
            right = self._matrix(name, "right", full.shape[-1], cdt, g.device)
            return (left @ full @ right.T).reshape(batch, p * p)
        if _is_conv1d(module):
            full = full.mT  # Conv1D stores its weight as (in, out)
        flat = full.reshape(batch, -1)
        return torch.cat([flat, grad_b], dim=-1) if grad_b is not None else flat

    def per_example(self, name: str, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Per-example vectors [B, dim] of module ``name`` from its inputs x and output grads g."""
        if self._cheap_path(name):
            return self.from_projected(name, self.project_inputs(name, x), g)
        return self.full_gradient(name, x, g)


TapFn = Callable[[str, torch.Tensor, torch.Tensor], None]


class LayerTap(_LayerHooks):
    """Hand each tracked layer's input x [B, T, in] and output gradient g [B, T, out] to ``fn``.

    The statistics methods (K-FAC / EK-FAC covariances, eigenvalue corrections, per-token
    scores) need the two factors of every per-token gradient g_t x_tᵀ rather than a
    per-example vector. As with :class:`GradientCollector`, autograd starts at the first
    tracked layer and no weight gradient is computed. With ``include_bias`` a column of
    ones is appended to x for layers that have a bias.
    """

    def __init__(self, modules: Mapping[str, nn.Module], fn: TapFn, include_bias: bool = False):
        super().__init__()
        self.modules = dict(modules)
        self.fn = fn
        self.include_bias = include_bias

    def _forward_hook(self, name: str, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
            return
        if not output.requires_grad:
            output.requires_grad_(True)
        out, n_in = module_shape(module)
        x = inputs[0].detach().reshape(inputs[0].shape[0], -1, n_in)
        if self.include_bias and getattr(module, "bias", None) is not None:
            x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], -1)
        self._inputs[name].append(x)
        output.register_hook(partial(self._backward, name, out))

    def _backward(self, name: str, out: int, grad: torch.Tensor) -> None:
        x = self._inputs[name].pop()
        self.fn(name, x, grad.reshape(grad.shape[0], -1, out))
