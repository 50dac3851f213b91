"""Mixture-of-experts weights as trackable layers: one ``nn.Linear`` view per expert and per router.

transformers 5 stores a MoE layer's routed experts as one module holding fused 3-D parameters
(``gate_up_proj``: experts x 2·inter x hidden, ``down_proj``: experts x hidden x inter, or ``up_proj``
without a gate; transposed and with biases in some families), called on the flattened tokens with each
token's top-k expert indices and routing weights; its router is a bare ``weight`` (experts x hidden)
applied to the same tokens. Neither is an ``nn.Linear``, so the hooks cannot see them as they are.

An :class:`ExpertLinear` is an ``nn.Linear`` whose ``weight`` is one expert's slice of a fused parameter
(in the (out x in) convention) or a router's weight. It holds no parameter of its own and is not a
child of the model: the model, its ``state_dict`` and its saved files are unchanged. While the hooks
are installed (:func:`installed`), the experts module's forward is replaced by an equivalent per-expert
loop that calls its views, each on the tokens routed to it, with ``routed`` holding the indices of
those tokens among the flattened batch (batch·seq); the router's forward runs as it is, with its
``F.linear`` on its own weight sent through its view. Everything after the views (the activation, the
gate, the routing weights, the sum over experts) stays in autograd, so a view's output gradient is
exact, the routing weight included, whatever the activation.

Views are named ``{experts}.expert{e}.{param}`` and, for a router, by the router's own name.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import BergsonError

_UP = ("gate_up_proj", "up_proj")


class ExpertLinear(nn.Linear):
    """An ``nn.Linear`` view of expert ``index`` of the fused parameter ``param`` of ``owner`` (a
    fused experts module), or of a router's whole weight (``index`` None). ``routed`` holds, during
    a call, the rows of the flattened batch the input's rows come from (None for a router, which
    sees every token)."""

    def __init__(self, owner: nn.Module, param: str, index: int | None, transposed: bool = False):
        nn.Module.__init__(self)
        # not a submodule (the view adds nothing to the model), and a weak reference: the views are
        # cached per owner, and a strong one would keep every model that ever had views alive
        self.__dict__["_owner"] = weakref.ref(owner)
        self.param = param
        self.index = index
        self.transposed = transposed
        self.routed: torch.Tensor | None = None
        self.out_features, self.in_features = (int(s) for s in self.weight.shape)

    @property
    def owner(self) -> nn.Module:
        """The fused experts module or router this view belongs to."""
        owner = self.__dict__["_owner"]()
        if owner is None:
            raise BergsonError("the module this expert view belonged to no longer exists")
        return owner

    @property
    def source(self) -> torch.Tensor:
        """The owner's parameter this view is a slice of."""
        return getattr(self.owner, self.param)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        w = self.source if self.index is None else self.source[self.index]
        return w.T if self.transposed else w

    @property
    def bias(self) -> torch.Tensor | None:  # type: ignore[override]
        if self.index is None:
            b = getattr(self.owner, "bias", None)
            return b if isinstance(b, torch.Tensor) else None
        b = getattr(self.owner, f"{self.param}_bias", None)
        return (
            b[self.index] if isinstance(b, torch.Tensor) and getattr(self.owner, "has_bias", False) else None
        )

    def grad_of(self, grad: torch.Tensor) -> torch.Tensor:
        """This view's (out x in) slice of a gradient of the whole source parameter."""
        g = grad if self.index is None else grad[self.index]
        return g.T if self.transposed else g

    def call(self, x: torch.Tensor, routed: torch.Tensor | None) -> torch.Tensor:
        self.routed = routed
        try:
            return self(x)
        finally:
            self.routed = None

    def extra_repr(self) -> str:
        where = self.param if self.index is None else f"{self.param}[{self.index}]"
        return f"{type(self.owner).__name__}.{where}, in_features={self.in_features}, out_features={self.out_features}"


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers-5 fused experts module (the ``use_experts_implementation``
    form: ``num_experts`` and 3-D ``gate_up_proj`` or ``up_proj`` and ``down_proj`` parameters)."""
    up = getattr(module, "gate_up_proj" if getattr(module, "has_gate", True) else "up_proj", None)
    down = getattr(module, "down_proj", None)
    n = getattr(module, "num_experts", None)
    return (
        isinstance(up, nn.Parameter)
        and isinstance(down, nn.Parameter)
        and up.ndim == 3
        and down.ndim == 3
        and up.shape[0] == down.shape[0] == n
    )


def _num_experts(module: nn.Module) -> int:
    n: Any = module.num_experts
    return int(n)


def is_router(module: nn.Module) -> bool:
    """Whether ``module`` is a top-k router: not a linear layer, with a bare 2-D ``weight`` of one
    row per expert (``num_experts``)."""
    weight = getattr(module, "weight", None)
    return (
        not isinstance(module, nn.Linear)
        and isinstance(weight, nn.Parameter)
        and weight.ndim == 2
        and weight.shape[0] == getattr(module, "num_experts", None)
        and "router" in type(module).__name__.lower()
    )


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a fused experts module or a router cannot be viewed (None when it can)."""
    if any(type(p).__name__ == "DTensor" for p in module.parameters(recurse=False)):
        return "its weights are sharded (FSDP); track the experts without --fsdp"
    if getattr(module, "has_post_expert_norm", False) and not isinstance(
        getattr(module, "post_expert_norm", None), nn.Module
    ):
        return "it declares a post-expert norm but has none"
    if getattr(module, "_is_expert_parallel", False):
        return "its experts are split across ranks (expert parallelism)"
    return None


_VIEWS: weakref.WeakKeyDictionary[nn.Module, dict[str, ExpertLinear]] = weakref.WeakKeyDictionary()


def views_of(module: nn.Module) -> dict[str, ExpertLinear]:
    """The views of a fused experts module (``expert{e}.{param}``, in expert order) or of a router
    (``''``), the same objects on every call."""
    cached = _VIEWS.get(module)
    if cached is not None:
        return cached
    why = unsupported_reason(module)
    if why:
        raise BergsonError(f"cannot track {type(module).__name__}: {why}")
    if is_router(module):
        views = {"": ExpertLinear(module, "weight", None)}
    elif is_fused_experts(module):
        transposed = bool(getattr(module, "is_transposed", False))
        up = _UP[0] if getattr(module, "has_gate", True) else _UP[1]
        views = {
            f"expert{e}.{p}": ExpertLinear(module, p, e, transposed)
            for e in range(_num_experts(module))
            for p in (up, "down_proj")
        }
    else:
        raise BergsonError(f"{type(module).__name__} is neither a fused experts module nor a router")
    _VIEWS[module] = views
    return views


def expert_views(model: nn.Module) -> Iterator[tuple[str, nn.Module, ExpertLinear]]:
    """Every view of the model's fused experts and routers, in module order, as (name, owner, view)."""
    for name, module in model.named_modules():
        if (is_router(module) or is_fused_experts(module)) and unsupported_reason(module) is None:
            for suffix, view in views_of(module).items():
                yield (f"{name}.{suffix}" if suffix else name), module, view


# ------------------------------------------------------------------ forwards through the views


def _experts_forward(
    module: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *args: Any,
    **kwargs: Any,
) -> torch.Tensor:
    """transformers' eager experts forward, with each expert's projections called through its views
    on the tokens routed to it."""
    if args or kwargs:
        raise BergsonError(
            f"{type(module).__name__}.forward got arguments beyond (hidden_states, top_k_index, "
            "top_k_weights); bergson cannot run its experts per expert: leave them untracked"
        )
    views = views_of(module)
    has_gate = getattr(module, "has_gate", True)
    up = _UP[0] if has_gate else _UP[1]
    out = torch.zeros_like(hidden_states)
    n = _num_experts(module)
    for e in torch.unique(top_k_index).tolist():
        if e >= n:  # an expert-parallel sentinel
            continue
        token, pos = torch.where(top_k_index == e)
        h = views[f"expert{e}.{up}"].call(hidden_states[token], token)
        h = module._apply_gate(h) if has_gate else module.act_fn(h)  # type: ignore[operator]
        z = views[f"expert{e}.down_proj"].call(h, token)
        if getattr(module, "has_post_expert_norm", False):
            z = module.post_expert_norm(z)  # type: ignore[operator]
        z = z * top_k_weights[token, pos, None]
        out.index_add_(0, token, z.to(out.dtype))
    return out


class _RouteLinear(TorchFunctionMode):
    """Sends ``F.linear(x, router.weight[, router.bias])`` through the router's view."""

    def __init__(self, view: ExpertLinear):
        super().__init__()
        self.view = view
        self.calls = 0

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and args[1] is self.view.source:
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if bias is None or bias is self.view.bias:
                self.calls += 1
                return self.view.call(args[0], None)
        return func(*args, **kwargs)


def _router_forward(module: nn.Module, original: Callable, *args: Any, **kwargs: Any) -> Any:
    (view,) = views_of(module).values()
    mode = _RouteLinear(view)
    with mode:
        out = original(*args, **kwargs)
    if mode.calls != 1:
        raise BergsonError(
            f"router {type(module).__name__} applied F.linear to its weight {mode.calls} times (expected once); "
            "bergson cannot track it: leave it out of --modules"
        )
    return out


@contextmanager
def installed(views: Iterable[nn.Module]) -> Iterator[None]:
    """While open, the owners of the given views (the other modules are ignored) run their
    forwards through their views; restores them on exit."""
    owners: dict[int, nn.Module] = {}
    for v in views:
        if isinstance(v, ExpertLinear):
            owners.setdefault(id(v.owner), v.owner)
    with ExitStack() as stack:
        for owner in owners.values():
            if "forward" in owner.__dict__:
                raise BergsonError(
                    f"{type(owner).__name__} already has its forward replaced; close the other hooks first"
                )
            if is_router(owner):
                owner.forward = _bind(_router_forward, owner, type(owner).forward.__get__(owner))
            else:
                owner.forward = _bind(_experts_forward, owner)
            stack.callback(owner.__dict__.pop, "forward", None)
        yield


def _bind(fn: Callable, *bound: Any) -> Callable:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return fn(*bound, *args, **kwargs)

    return forward


def named_trackables(model: nn.Module) -> dict[str, nn.Module]:
    """``model.named_modules()`` with the views of its experts and routers added under their names:
    what a module name in a store, an option or an argument can refer to."""
    named: dict[str, nn.Module] = dict(model.named_modules())
    named.update((n, v) for n, _, v in expert_views(model))
    return named


def parameter_of(module: nn.Module, param: str) -> tuple[Any, Callable[[Any], Any]]:
    """The parameter object behind a tracked module's ``param`` ('weight' or 'bias') and a map from
    a tensor shaped like that parameter (an optimizer's state of it) to the module's own part: the
    identity for a layer, the expert's slice for an expert view (a router's view is its whole
    weight). For reading per-parameter state such as optimizer moments."""
    if not isinstance(module, ExpertLinear):
        return getattr(module, param, None), lambda t: t
    if module.index is None:
        return (module.source if param == "weight" else module.bias), lambda t: t
    if module.transposed:
        raise BergsonError(
            f"{type(module.owner).__name__} stores its experts transposed; reading optimizer state for its "
            "experts is not supported: drop the normalizer or leave the experts untracked"
        )
    source = module.source if param == "weight" else getattr(module.owner, f"{module.param}_bias", None)
    index = module.index

    def part(t: Any) -> Any:
        return t[index] if isinstance(t, torch.Tensor) and t.ndim >= 1 else t

    return source, part
