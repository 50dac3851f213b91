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

Each forward call's layer input is bound to the hook on that call's output tensor, so the
backward hook that fires always meets the input of the forward that made its output. This is
what makes activation (gradient) checkpointing work: the non-reentrant
``torch.utils.checkpoint`` (the transformers default) reruns layers during backward only to
refill saved tensors, and the gradient flows through the original outputs, so the recomputed
outputs' hooks never fire; the reentrant form runs the first forward without grad (no hook is
registered) and backpropagates through the recomputed outputs. A forward that runs inside a
backward pass (a recomputation) keeps the bare input and projects it only if its hook fires.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from ..core.experts import ExpertLinear, installed, named_trackables
from ..core.layout import (
    AttentionConfig,
    Block,
    ModuleLayout,
    base_model_prefix,
    column_layouts,
    is_conv1d,
    module_blocks,
    module_shape,
    resolve_heads,
    some_names,
)
from ..errors import BergsonError
from ..transforms.normalizers import AdafactorNormalizer, AdamNormalizer, KfacWhitening, Normalizer
from ..transforms.projection import projection_matrix

Closure = Callable[[str, torch.Tensor], None]


def in_backward() -> bool:
    """Whether autograd is running a backward pass now (a forward here is a checkpoint's
    recomputation)."""
    return torch._C._current_graph_task_id() != -1


def resolve_modules(
    model: nn.Module, modules: Mapping[str, nn.Module] | Sequence[str] | None
) -> dict[str, nn.Module]:
    """The tracked layers by name: ``modules`` itself (a mapping), the model's modules of those
    names, or by default every layer :func:`bergson.models.find_tracked_modules` finds."""
    from ..models import find_tracked_modules

    if modules is None:
        return find_tracked_modules(model)
    if isinstance(modules, Mapping):
        return dict(modules)
    named = named_trackables(model)
    prefix = base_model_prefix(model)
    out: dict[str, nn.Module] = {}
    for m in modules:  # exact names, spelled from the model or from its base model
        full = m if m in named else f"{prefix}.{m}" if prefix and f"{prefix}.{m}" in named else None
        if full is None:
            raise BergsonError(
                f"modules: no module named {m!r} in the model; its layers are "
                f"{some_names([n for n, x in named.items() if isinstance(x, nn.Linear) or is_conv1d(x)], prefix)}"
            )
        out[full] = named[full]
    return out


Routed = tuple[torch.Tensor, int, int]
"""A routed expert view's call: the rows of the flattened batch its input rows come from, and the
batch's (batch, seq)."""


def routed_rows(name: str, module: nn.Module, shape: tuple[int, int] | None) -> Routed | None:
    """For an expert view (:class:`bergson.core.experts.ExpertLinear`) called on the tokens routed to
    it: where its rows sit in the batch; None for any other layer (and a router, which sees them all)."""
    index = module.routed if isinstance(module, ExpertLinear) else None
    if index is None:
        return None
    if shape is None:
        raise BergsonError(
            f"expert {name!r} ran outside a pass whose batch shape is known; run the model on input_ids "
            "(or through bergson's pass engine) so its routed tokens can be mapped back to documents"
        )
    return index, shape[0], shape[1]


def scatter_rows(t: torch.Tensor, routed: Routed) -> torch.Tensor:
    """A routed call's per-row tensor (rows, ·) laid out on the batch's grid (batch, seq, ·), zero at
    the tokens the expert did not see."""
    index, batch, seq = routed
    t = t.reshape(-1, t.shape[-1])
    return t.new_zeros(batch * seq, t.shape[-1]).index_copy_(0, index, t).reshape(batch, seq, -1)


def token_rows(
    name: str, x: torch.Tensor, n_in: int, batch_shape: tuple[int, int] | None
) -> tuple[int, int] | None:
    """How a layer's input ``x`` (last axis ``n_in``) maps to the batch's documents.

    Layers are called on ``(batch, seq, in)`` or on the flattened tokens ``(batch·seq, in)``
    (shared experts, some MLP blocks). With the batch's ``(batch, seq)`` known, returns None when
    the leading axis is the batch (x already has one entry per document) and ``(batch, seq)``
    when x holds every token of the batch once in row-major order; any other row count (a
    gathered subset of tokens, as routed experts see) is a :class:`BergsonError`, since its rows
    cannot be mapped back to documents. Without a known batch shape the leading axis is taken as
    the batch."""
    if batch_shape is None or x.shape[0] == batch_shape[0]:
        return None
    batch, seq = batch_shape
    if x.ndim >= 2 and x.numel() == batch * seq * n_in and x.shape[0] == batch * seq:
        return batch, seq
    raise BergsonError(
        f"module {name!r} was called on {x.shape[0]} rows, neither the batch ({batch} documents) nor "
        f"its {batch * seq} tokens (batch x sequence): its rows cannot be mapped back to documents. "
        "Routed experts are tracked through bergson's per-expert views (--track_experts); another layer "
        "that sees a gathered subset of tokens cannot be: leave it out of the tracked modules (--modules, "
        "or modules= in Python)"
    )


class _LayerHooks:
    """Forward hooks on every tracked layer while the context is open; subclasses define
    ``_forward_hook(name, module, inputs, output)``, which binds what it keeps of the layer
    input to a hook on the output tensor.

    ``batch_shape`` is the ``(batch, seq)`` of the batch in flight (the pass engine sets it; None
    when unknown): with it, a layer called on the flattened tokens ``(batch·seq, in)`` has its
    input and output gradient viewed as ``(batch, seq, ·)`` (:func:`token_rows`). Outside the
    engine (a trainer's own steps, a traced forward), a ``root`` module's calls tell it: the
    shape of their ``input_ids`` (or ``inputs_embeds``, or a first argument of token ids)."""

    modules: dict[str, nn.Module]

    def __init__(self, root: nn.Module | None = None) -> None:
        self._handles: list[Any] = []
        self.batch_shape: tuple[int, int] | None = None
        self._root = root
        self._seen: tuple[int, int] | None = None  # from the root's last call
        self._passes = 0  # calls of the root so far

    def _current_shape(self) -> tuple[int, int] | None:
        return self.batch_shape if self.batch_shape is not None else self._seen

    def _root_call(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._passes += 1
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            ids = args[0]
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        self._seen = (
            (int(ids.shape[0]), int(ids.shape[1]))
            if isinstance(ids, torch.Tensor) and ids.ndim >= 2
            else None
        )

    def _forward_hook(self, name: str, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        self._views = installed(self.modules.values())  # experts and routers run through their views
        self._views.__enter__()
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(partial(self._forward_hook, name)))
        if self._root is not None:
            self._handles.append(self._root.register_forward_pre_hook(self._root_call, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen = None
        self._views.__exit__(None, None, None)


class GradientCollector(_LayerHooks):
    """Collect per-example (projected) gradients of tracked layers during backward.

    Open it as a context manager around a forward pass and the backward pass of the summed
    per-example losses (the pass engine, :class:`bergson.collect.engine.PassEngine`, does both);
    ``collector.gradients`` then holds ``{block name: [batch, dim]}``.

    With ``closure=fn``, ``fn(block_name, grads)`` is called for each column block as soon as
    its per-example gradients ([batch, dim]) are ready during the backward pass, and nothing
    is kept. The batch's loss must be a sum of per-example losses.

    ``normalizers`` maps module names to an :class:`AdafactorNormalizer` (applied as row and
    column scales before projection) or an :class:`AdamNormalizer` (applied to the full
    per-example gradient, which is then projected) or a :class:`KfacWhitening` (G becomes
    S^-1/2 G A^-1/2, folded into the projection matrices like the Adafactor scales; whole modules
    only, not head or expert blocks). Normalizer shapes are in the ``(out, in)`` convention of
    ``nn.Linear`` for every layer type.

    ``heads`` splits modules into attention heads (:class:`AttentionConfig` per module name
    or glob pattern): each head becomes its own block ``'{module}.head{h}'`` with its own
    projection; the blocks of a module concatenate to the module's gradient.

    With ``aggregate_experts`` the expert views of each fused parameter add into one block named
    after it (``'{experts}.gate_up_proj'``): expert e contributes L_e G_e Rᵀ with its own left and
    the parameter's shared right projection, so the block is the projection of the stacked
    (experts·out x in) gradient (``projection_dim`` > 0 only).

    With ``per_token`` every position keeps its own term g_t x_tᵀ of the sum G = Σ_t g_t x_tᵀ
    (normalized and projected like a whole example): vectors are [batch, positions, dim] and
    sum over positions to the per-example vectors. Padding positions get zero vectors.
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
        heads: Mapping[str, AttentionConfig] | Sequence[str] | None = None,
        per_token: bool = False,
        aggregate_experts: bool = False,
    ):
        if projection_dim < 0:
            raise BergsonError(f"projection_dim {projection_dim}: must be >= 0 (0 keeps the full gradients)")
        self.model = model
        self.modules = resolve_modules(model, modules)
        self.projection_dim = projection_dim
        self.seed = seed
        self.include_bias = include_bias
        self.normalizers: dict[str, Normalizer] = dict(normalizers or {})
        unknown = set(self.normalizers) - set(self.modules)
        if unknown:
            raise BergsonError(
                f"normalizers given for untracked modules: {sorted(unknown)}; track them with modules= "
                "or leave their normalizers out"
            )
        self.heads = resolve_heads(self.modules, heads, base_model_prefix(model))
        self.aggregate_experts = aggregate_experts
        self.blocks: dict[str, list[Block]] = {
            n: module_blocks(n, m, include_bias, self.heads.get(n), aggregate_experts)
            for n, m in self.modules.items()
        }
        self._layouts = self.layouts  # checks the blocks (an aggregated block needs p > 0)
        for name, norm in self.normalizers.items():
            split = len(self.blocks[name]) > 1 or self.blocks[name][0].column is not None
            if isinstance(norm, KfacWhitening) and split:
                raise BergsonError(
                    f"--whitening: {name} is split into head or expert blocks, and K-FAC whitening mixes "
                    "the rows of the whole module; drop --attention_heads / --track_experts for it"
                )
        self.closure = closure
        self.per_token = per_token
        super().__init__(model)
        self._grads: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._filled: dict[str, int] = {}  # aggregated column -> the forward pass it was last filled in
        self._proj: dict[tuple[str, str, torch.dtype, torch.device], torch.Tensor] = {}
        self._scaled: dict[tuple[str, torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ layout
    @property
    def layouts(self) -> list[ModuleLayout]:
        """The column block of every block (a module, or one of its heads), with its offset in
        the row (:func:`bergson.core.layout.column_layouts`)."""
        return column_layouts(
            self.modules, self.projection_dim, self.include_bias, self.heads, aggregate=self.aggregate_experts
        )

    @property
    def dims(self) -> dict[str, int]:
        """Vector length per column block (a module, or one of its heads), in tracking order."""
        return {b.col: b.dim(self.projection_dim) for blocks in self.blocks.values() for b in blocks}

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
        routed = routed_rows(name, module, self._current_shape())
        rows = (
            None
            if routed is not None
            else token_rows(name, x, module_shape(module)[1], self._current_shape())
        )
        if rows is not None:
            x = x.reshape(*rows, x.shape[-1])
        elif routed is not None:  # a routed expert's tokens: one pseudo-document until the backward
            x = x[None]
        # On the projected path only R x is kept, so the layer input can be freed early. A
        # checkpoint's recomputation keeps x itself: its hook fires only in the reentrant form.
        saved: Any = x
        if self._cheap_path(name) and not in_backward():
            saved = [self.project_inputs(b, x) for b in self.blocks[name]]
        output.register_hook(partial(self._backward_hook, name, saved, rows, routed))

    def _backward_hook(
        self, name: str, saved: Any, rows: tuple[int, int] | None, routed: Routed | None, grad: torch.Tensor
    ) -> None:
        if rows is not None:  # the layer ran on the flattened tokens: back to (batch, seq, out)
            grad = grad.reshape(*rows, grad.shape[-1])
        if self._cheap_path(name) and isinstance(saved, torch.Tensor):
            saved = [self.project_inputs(b, saved) for b in self.blocks[name]]
        if routed is not None:  # a routed expert: its rows back on the batch's grid, zero elsewhere
            grad = scatter_rows(grad, routed)
            saved = (
                scatter_rows(saved, routed)
                if isinstance(saved, torch.Tensor)
                else [scatter_rows(s, routed) for s in saved]
            )
        batch = grad.shape[0]
        if self.per_token:
            # each position is an "example" of one token: its term g_t x_t^T
            grad = grad.reshape(-1, 1, grad.shape[-1])
            if self._cheap_path(name):
                saved = [s.reshape(-1, 1, s.shape[-1]) for s in saved]
            else:
                saved = saved.reshape(-1, 1, saved.shape[-1])
        for k, block in enumerate(self.blocks[name]):
            if self._cheap_path(name):
                vec = self.from_projected(block, saved[k], grad)
            else:
                vec = self.full_gradient(block, saved, grad)
            if self.per_token:
                vec = vec.reshape(batch, -1, vec.shape[-1])
            if self.closure is not None:
                self.closure(block.col, vec)
            elif block.column is not None and self._filled.get(block.column) == self._passes:
                self._grads[block.column][-1] = (
                    self._grads[block.column][-1] + vec
                )  # another expert, same pass
            else:
                self._grads[block.col].append(vec)
                self._filled[block.col] = self._passes

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

    def _adafactor_scales(self, block: Block) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The block's slice of the module's Adafactor row scale and column scale (bias last)."""
        norm = self.normalizers.get(block.module)
        if not isinstance(norm, AdafactorNormalizer):
            return None
        a, b = norm.scales(block.bias)
        n_in = module_shape(self.modules[block.module])[1]
        cols = b[block.cols]
        return a[block.rows], torch.cat([cols, b[n_in:]]) if block.bias else cols

    def _scaled_matrices(
        self, block: Block, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """L (p x out) and R (p x in[+1]) of a block with an Adafactor normalizer's row and column
        scales folded in, so that L diag(a) G diag(b) R^T costs no extra pass over G."""
        key = (block.name, dtype, device)
        cached = self._scaled.get(key)
        if cached is not None:
            return cached
        out, n_in = block.shape
        left = self._matrix(block.name, "left", out, dtype, device)
        right = self._matrix(block.col, "right", n_in + int(block.bias), dtype, device)
        scales = self._adafactor_scales(block)
        norm = self.normalizers.get(block.module)
        if scales is not None:
            left = left * scales[0].to(device, dtype)
            right = right * scales[1].to(device, dtype)
        elif isinstance(norm, KfacWhitening):  # L S^-1/2 and R A^-1/2 (symmetric factors)
            left = left @ norm.left.to(device, dtype)
            right = right @ norm.right.to(device, dtype)
        self._scaled[key] = (left, right)
        return left, right

    def project_inputs(self, block: Block | str, x: torch.Tensor) -> torch.Tensor:
        """R x for every position: [B, S, p] (the bias column, if any, adds R's last column)."""
        block = self._block(block)
        n_in = module_shape(self.modules[block.module])[1]
        cdt = self._compute_dtype(x)
        x = x.reshape(x.shape[0], -1, n_in)[..., block.cols].to(cdt)
        _, right = self._scaled_matrices(block, cdt, x.device)
        width = block.shape[1]
        xp = x @ right[:, :width].T
        if block.bias:
            xp = xp + right[:, width]
        return xp

    def from_projected(self, block: Block | str, xp: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """vec(sum_t (L g_t)(R x_t)^T) per example: [B, p*p]."""
        block = self._block(block)
        out = module_shape(self.modules[block.module])[0]
        batch = g.shape[0]
        g = g.reshape(batch, -1, out)[..., block.rows].to(xp.dtype)
        left, _ = self._scaled_matrices(block, xp.dtype, xp.device)
        return (g @ left.T).mT.bmm(xp).reshape(batch, -1)

    def full_gradient(self, block: Block | str, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The per-example gradient of a block formed explicitly (p = 0, or an Adam normalizer),
        then normalized and projected if asked; p = 0 returns the parameter's own layout."""
        block = self._block(block)
        module = self.modules[block.module]
        out, n_in = module_shape(module)
        batch = g.shape[0]
        cdt = self._compute_dtype(g)
        x = x.reshape(batch, -1, n_in)[..., block.cols].to(cdt)
        g = g.reshape(batch, -1, out)[..., block.rows].to(cdt)
        full = g.mT.bmm(x)  # [B, out, in] of the block
        grad_b = g.sum(1) if block.bias else None
        norm = self.normalizers.get(block.module)
        scales = self._adafactor_scales(block)
        if scales is not None:
            a, b = scales
            full = full * a.to(full)[:, None] * b[: full.shape[-1]].to(full)
            if grad_b is not None:
                grad_b = grad_b * a.to(grad_b) * b[-1].to(grad_b)
        elif isinstance(norm, AdamNormalizer):
            sliced = AdamNormalizer(
                norm.weight[block.rows, block.cols],
                None if norm.bias is None else norm.bias[block.rows],
                norm.eps,
            )
            full, grad_b = sliced.apply(full, grad_b)
        elif isinstance(norm, KfacWhitening):
            width = full.shape[-1]
            aug = torch.cat([full, grad_b.unsqueeze(-1)], dim=-1) if grad_b is not None else full
            aug = norm.apply(aug)
            full, grad_b = aug[..., :width], (aug[..., width] if grad_b is not None else None)
        p = self.projection_dim
        if p > 0:
            if grad_b is not None:
                full = torch.cat([full, grad_b.unsqueeze(-1)], dim=-1)
            left = self._matrix(block.name, "left", full.shape[1], cdt, g.device)
            right = self._matrix(block.col, "right", full.shape[-1], cdt, g.device)
            return (left @ full @ right.T).reshape(batch, p * p)
        if is_conv1d(module):
            full = full.mT  # Conv1D stores its weight as (in, out)
        flat = full.reshape(batch, -1)
        return torch.cat([flat, grad_b], dim=-1) if grad_b is not None else flat

    def _block(self, block: Block | str) -> Block:
        """A block, or the single block of an unsplit module given by name."""
        if isinstance(block, Block):
            return block
        (only,) = self.blocks[block]
        return only

    def per_example(self, block: Block | str, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Per-example vectors [B, dim] of a block (or unsplit module) from its module's inputs x
        and output grads g."""
        if self._cheap_path(self._block(block).module):
            return self.from_projected(block, self.project_inputs(block, x), g)
        return self.full_gradient(block, x, g)


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
        x = inputs[0].detach()
        routed = routed_rows(name, module, self._current_shape())
        if routed is None:
            rows = token_rows(name, x, n_in, self._current_shape())
            x = x.reshape(x.shape[0] if rows is None else rows[0], -1, n_in)
        if self.include_bias and getattr(module, "bias", None) is not None:
            x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], -1)
        output.register_hook(partial(self._backward, name, out, x, routed))

    def _backward(
        self, name: str, out: int, x: torch.Tensor, routed: Routed | None, grad: torch.Tensor
    ) -> None:
        if routed is not None:  # a routed expert: its tokens back on the batch's grid, zero elsewhere
            x, grad = scatter_rows(x, routed), scatter_rows(grad, routed)
        self.fn(name, x, grad.reshape(x.shape[0], -1, out))
