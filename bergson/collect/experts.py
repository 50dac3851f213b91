"""Per-expert, per-document gradients of fused MoE expert weights (transformers 5 form).

OLMoE, Mixtral, Qwen2-MoE and Qwen3-MoE store their routed experts as one module holding
``gate_up_proj`` (experts x 2·inter x hidden) and ``down_proj`` (experts x hidden x inter).
Its forward, called on the flattened tokens ``x`` (batch·seq x hidden) with each token's top-k
expert indices and routing weights, computes for a token t routed to expert e with weight w::

    u = W_gu[e] x_t,  (a, b) = split(u),  h = act(a) * b,  z = W_d[e] h,  y_t += w * z

so with G_t the gradient of the loss with respect to the module's output row t, the gradient
with respect to z is w·G_t (the routing weight multiplies the expert output, so the module's
output gradient does not yet include it) and with respect to u it is
(act'(a) * b * s, act(a) * s) with s = W_d[e]^T (w·G_t). Expert e's weight gradients for
document n are then sums of outer products over n's tokens routed to e:
``down``: sum_t (w G_t) h_t^T and ``gate_up``: sum_t du_t x_t^T, the same (g, x) form as a
linear layer's, so a projection L G R^T = sum_t (L g_t)(R x_t)^T applies unchanged.

The derivative of the activation is written out, so the collector's backward pass stays the
only one; activations other than SiLU are refused with the reason.

This module is the tested maths of the per-expert blocks; it is not yet wired into the
collector, the layouts or the command line.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bergson.errors import BergsonError

PARAMS = ("gate_up_proj", "down_proj")


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers-5 fused experts module this file knows."""
    gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (
        isinstance(gu, nn.Parameter)
        and isinstance(down, nn.Parameter)
        and gu.ndim == 3
        and down.ndim == 3
        and gu.shape[0] == down.shape[0]
        and gu.shape[1] == 2 * down.shape[2]
        and gu.shape[2] == down.shape[1]
    )


def _act_and_slope(module: nn.Module, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    act = getattr(module, "act_fn", None)
    if isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation":
        sig = torch.sigmoid(a)
        return a * sig, sig * (1 + a * (1 - sig))
    raise BergsonError(
        f"expert tracking supports the SiLU activation only, got {type(act).__name__}: "
        "leave the experts out of the tracked modules"
    )


@dataclass
class ExpertRows:
    """One expert parameter's factors: gradient g_t and input x_t per routed token row."""

    token: torch.Tensor  # (k,) flattened token index (row of the batch·seq input)
    g: torch.Tensor  # (k, out)
    x: torch.Tensor  # (k, in)


def expert_rows(
    module: nn.Module,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    grad_out: torch.Tensor,
) -> dict[str, ExpertRows]:
    """Factors of every hit expert's weight gradients, keyed ``expert{e}.gate_up_proj`` /
    ``expert{e}.down_proj``, from the module's forward inputs and its output gradient."""
    if not is_fused_experts(module):
        raise BergsonError(f"{type(module).__name__} is not a fused experts module")
    gu, down = module.gate_up_proj, module.down_proj
    assert isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor)
    w_gu, w_d = gu.detach(), down.detach()
    n_exp = w_gu.shape[0]
    hidden, grad_out = hidden.detach(), grad_out.detach()
    out: dict[str, ExpertRows] = {}
    for e in range(n_exp):
        token, pos = torch.where(top_k_index == e)
        if token.numel() == 0:
            continue
        x = hidden[token]
        u = x @ w_gu[e].T.to(x.dtype)
        a, b = u.chunk(2, dim=-1)
        act, slope = _act_and_slope(module, a)
        h = act * b
        w = top_k_weights.detach()[token, pos].to(grad_out.dtype)
        g_z = grad_out[token] * w[:, None]
        s = g_z @ w_d[e].to(g_z.dtype)
        g_u = torch.cat([slope * b * s, act * s], dim=-1)
        out[f"expert{e}.down_proj"] = ExpertRows(token, g_z, h)
        out[f"expert{e}.gate_up_proj"] = ExpertRows(token, g_u, x)
    return out


def per_document(
    rows: ExpertRows,
    doc_of_token: torch.Tensor,
    n_docs: int,
    left: torch.Tensor | None = None,
    right: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-document gradient sum_t g_t x_t^T (n_docs x out x in), or projected
    sum_t (L g_t)(R x_t)^T (n_docs x p x q) when ``left`` (p x out) and ``right`` (q x in)
    are given."""
    g, x = rows.g, rows.x
    if left is not None:
        g = g @ left.T.to(g.dtype)
    if right is not None:
        x = x @ right.T.to(x.dtype)
    outer = g[:, :, None] * x[:, None, :]
    res = outer.new_zeros(n_docs, *outer.shape[1:])
    return res.index_add_(0, doc_of_token[rows.token], outer)


class ExpertCapture:
    """Hooks one fused experts module: keeps the forward's inputs and, once the backward
    reaches its output, the per-expert factors in ``rows`` (a list, one entry per call)."""

    def __init__(self, module: nn.Module):
        if not is_fused_experts(module):
            raise BergsonError(f"{type(module).__name__} is not a fused experts module")
        self.module = module
        self.rows: list[dict[str, ExpertRows]] = []
        self._handle = module.register_forward_hook(self._forward, with_kwargs=True)

    def _forward(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        names = ("hidden_states", "top_k_index", "top_k_weights")
        vals = list(args) + [kwargs[n] for n in names[len(args) :]]
        hidden, index, weights = vals[:3]
        if output.requires_grad:

            def grad_hook(g: torch.Tensor) -> None:
                self.rows.append(expert_rows(module, hidden, index, weights, g))

            output.register_hook(grad_hook)

    def remove(self) -> None:
        self._handle.remove()


def is_topk_router(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers-5 top-k router: a bare ``weight`` (experts x hidden)
    applied to the flattened tokens, returning the logits first."""
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, nn.Parameter)
        and weight.ndim == 2
        and type(module).__name__.endswith("TopKRouter")
        and weight.shape[0] == getattr(module, "num_experts", None)
    )


class RouterCapture:
    """Hooks one top-k router: every token row of the batch is an input of the router's
    linear map, so its factors are (gradient of the logits, input) per flattened token,
    appended to ``rows`` once the backward reaches the logits."""

    def __init__(self, module: nn.Module):
        if not is_topk_router(module):
            raise BergsonError(f"{type(module).__name__} is not a top-k router")
        self.rows: list[ExpertRows] = []
        self._handle = module.register_forward_hook(self._forward)

    def _forward(self, module: nn.Module, args: tuple, output: tuple) -> None:
        logits = output[0]
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        x = args[0].detach().reshape(-1, weight.shape[1])
        if logits.requires_grad:
            token = torch.arange(x.shape[0], device=x.device)

            def grad_hook(g: torch.Tensor) -> None:
                self.rows.append(ExpertRows(token, g.detach().reshape(x.shape[0], -1), x))

            logits.register_hook(grad_hook)

    def remove(self) -> None:
        self._handle.remove()
