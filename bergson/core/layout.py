"""The vocabulary of tracked layers and their column blocks, shared by every layer of bergson.

A tracked layer (``nn.Linear`` or GPT-2's ``Conv1D``) has a weight of shape (out x in) in the
``nn.Linear`` convention. Its gradient is stored as one column block, or as one block per
attention head; :func:`column_layouts` lays every block of a model out in one row, and
:class:`ModuleLayout` is how a store, an in-memory result or a preconditioner records each block.
This module imports nothing of bergson but its errors and the bottom floor.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import BergsonError
from .experts import ExpertLinear
from .files import describe_difference

HEAD_AXES = {"out": 0, "0": 0, "2": 0, "in": 1, "1": 1}
"""Accepted spellings of the axis attention heads lie on: out (0) and in (1) of the (out x in)
weight, and 2, the original package's number for the output axis (the feature axis of a
[batch, seq, out] output gradient)."""


@dataclass(frozen=True)
class AttentionConfig:
    """How one module's gradient splits into attention heads: ``num_heads`` consecutive blocks of
    ``head_size`` features along axis ``head_dim`` of the (out x in) weight.

    ``head_dim=0`` splits the output axis (rows): query, key and value projections, and fused qkv
    layers whose rows are grouped per head (GPT-NeoX). ``head_dim=1`` splits the input axis
    (columns): the attention output projection, whose inputs are the concatenated heads.
    ``head_dim=2`` is the original package's spelling of the output axis (it counted the axes of
    the [batch, seq, out] output gradient) and is stored as 0, so
    ``AttentionConfig(16, 4, head_dim=2) == AttentionConfig(16, 4, head_dim=0)``.
    ``num_heads * head_size`` must equal the size of that axis.
    """

    num_heads: int
    head_size: int
    head_dim: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.head_dim, bool) or self.head_dim not in (0, 1, 2):
            raise BergsonError(
                f"AttentionConfig head_dim={self.head_dim!r}: accepted values are 0 (heads on the output rows "
                "of the (out x in) weight: q/k/v, fused qkv), 1 (heads on the input columns: the attention "
                "output projection) and 2, the original package's number for the output axis (same as 0)"
            )
        object.__setattr__(self, "head_dim", HEAD_AXES[str(self.head_dim)])  # 2 -> 0
        if self.num_heads < 1 or self.head_size < 1:
            raise BergsonError(
                f"AttentionConfig(num_heads={self.num_heads}, head_size={self.head_size}): both must be at least 1"
            )

    @property
    def axis(self) -> str:
        """'out' or 'in': the axis of the (out x in) weight the heads split."""
        return "out" if self.head_dim == 0 else "in"

    @classmethod
    def parse(cls, spec: str) -> tuple[str, AttentionConfig]:
        """``'PATTERN=NUM_HEADS:HEAD_SIZE:AXIS'`` (AXIS: out, in, 0, 1, or 2 = out) -> (pattern, config)."""
        pattern, _, rest = spec.partition("=")
        parts = rest.split(":")
        if (
            not pattern
            or len(parts) != 3
            or parts[2] not in HEAD_AXES
            or not all(p.isdigit() and int(p) > 0 for p in parts[:2])
        ):
            raise BergsonError(
                f"--attention_heads {spec!r}: expected MODULE_PATTERN=NUM_HEADS:HEAD_SIZE:AXIS with AXIS "
                "out (or 0, or the original package's 2: heads on the output rows: q/k/v, fused qkv) or in "
                "(or 1: heads on the input columns: the attention output projection), "
                "e.g. 'gpt_neox.layers.*.attention.dense=4:16:in'"
            )
        return pattern, cls(int(parts[0]), int(parts[1]), HEAD_AXES[parts[2]])


@dataclass
class ModuleLayout:
    """One module's block of columns in every row."""

    name: str
    type: str
    shape: list[int]
    """(out, in) of the layer, in the nn.Linear convention."""
    bias: bool
    offset: int
    dim: int
    head: dict[str, Any] | None = None
    """For one attention head's block: the module, head index, axis ('out' or 'in') and the
    [start, stop) range of that axis it covers."""
    experts: list[str] | None = None
    """For a fused experts parameter aggregated into one block (``--aggregate_experts``): the expert
    views whose projected gradients sum into it, in order (their rows stack to ``shape``)."""


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style ``transformers.pytorch_utils.Conv1D``: a linear layer whose weight is stored (in x out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def module_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a tracked layer."""
    if is_conv1d(module):
        weight: torch.Tensor = module.weight  # type: ignore[assignment]
        return int(weight.shape[1]), int(weight.shape[0])
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    raise BergsonError(
        f"cannot track a {type(module).__name__}: gradients are collected for nn.Linear and GPT-2's "
        "Conv1D layers; choose those with --modules"
    )


@dataclass(frozen=True)
class Block:
    """The part of a tracked module stored as one column block: the whole module, or one
    attention head (rows ``rows`` of the output axis and columns ``cols`` of the input axis)."""

    name: str
    module: str
    rows: slice
    cols: slice
    bias: bool
    head: dict[str, Any] | None = None
    column: str | None = None
    """The column block this block's projected vector adds into, when it is not its own: the
    aggregated block of a fused experts parameter (its right projection is the column's, shared by
    every expert, and its left one its own, so the sum is L [G_0; G_1; ...] Rᵀ)."""

    @property
    def col(self) -> str:
        """The name of the column block the block's vector is written to."""
        return self.column or self.name

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows.stop - self.rows.start, self.cols.stop - self.cols.start

    def dim(self, projection_dim: int) -> int:
        """Length of the block's stored vector."""
        if projection_dim > 0:
            return projection_dim * projection_dim
        out, n_in = self.shape
        return out * n_in + (out if self.bias else 0)


def aggregated_column(name: str, module: nn.Module) -> str | None:
    """The aggregated column of an expert view ``{experts}.expert{e}.{param}``: ``{experts}.{param}``
    (None for any other module)."""
    if not isinstance(module, ExpertLinear) or module.index is None:
        return None
    return f"{name.rsplit('.expert', 1)[0]}.{module.param}"


def module_blocks(
    name: str,
    module: nn.Module,
    include_bias: bool,
    heads: AttentionConfig | None = None,
    aggregate: bool = False,
) -> list[Block]:
    """The column blocks of a tracked module: itself, or one block per attention head named
    ``'{name}.head{h}'``. Heads must tile their axis exactly. With ``aggregate`` an expert view's
    block adds into its fused parameter's column (:func:`aggregated_column`)."""
    out, n_in = module_shape(module)
    has_bias = include_bias and getattr(module, "bias", None) is not None
    column = aggregated_column(name, module) if aggregate else None
    if column is not None and heads is not None:
        raise BergsonError(f"{name}: an aggregated expert block cannot also be split into attention heads")
    if heads is None:
        return [Block(name, name, slice(0, out), slice(0, n_in), has_bias, column=column)]
    axis = heads.axis
    size = out if heads.head_dim == 0 else n_in
    if heads.num_heads * heads.head_size != size:
        raise BergsonError(
            f"attention heads of {name}: {heads.num_heads} heads x {heads.head_size} features = "
            f"{heads.num_heads * heads.head_size}, but the layer is {out} (out) x {n_in} (in), so its {axis} "
            f"axis (head_dim={heads.head_dim}) has {size} features; give num_heads x head_size = {size}, "
            "or split the other axis"
        )
    if has_bias and heads.head_dim == 1:
        raise BergsonError(
            f"attention heads of {name} lie on its input axis, where the bias belongs to no head; "
            "drop --include_bias or split this module on its output axis"
        )
    blocks = []
    for h in range(heads.num_heads):
        span = slice(h * heads.head_size, (h + 1) * heads.head_size)
        info = {"module": name, "index": h, "num_heads": heads.num_heads, "axis": axis,
                "start": span.start, "stop": span.stop}  # fmt: skip
        rows, cols = (span, slice(0, n_in)) if heads.head_dim == 0 else (slice(0, out), span)
        blocks.append(Block(f"{name}.head{h}", name, rows, cols, has_bias, info))
    return blocks


# ------------------------------------------------------------------ module names
# A module is named from the whole model (``gpt_neox.layers.0.attention.dense``), as bergson writes
# it, or from the model's ``base_model`` (``layers.0.attention.dense``), as the original package
# did. Every option and argument that takes a module name or pattern accepts both spellings,
# through the functions below.


def base_model_prefix(model: nn.Module) -> str:
    """The dotted name of ``model.base_model`` inside ``model`` (``'gpt_neox'``, ``'transformer'``;
    ``'base_model'`` for a PEFT model): '' when the model has no ``base_model`` or is its own."""
    base = getattr(model, "base_model", None)
    if not isinstance(base, nn.Module) or base is model:
        return ""
    for name, module in model.named_modules():
        if module is base:
            return name
    return ""


def in_base_model(name: str, prefix: str) -> bool:
    """Whether module ``name`` (spelled from the whole model) lies inside the base model at ``prefix``."""
    return not prefix or name.startswith(prefix + ".")


def names_module(name: str, pattern: str, prefix: str) -> bool:
    """Whether ``pattern`` (an exact name or a glob, spelled from the whole model or from its base
    model at ``prefix``) names the module ``name`` (spelled from the whole model)."""
    if fnmatch.fnmatchcase(name, pattern):
        return True
    return bool(prefix) and fnmatch.fnmatchcase(name, f"{prefix}.{pattern}")


def some_names(names: Sequence[str], prefix: str) -> str:
    """A few of ``names`` for an error message, and how they are spelled from the base model."""
    names = list(names)
    shown = names[:3] + (names[-1:] if len(names) > 3 else [])
    text = ", ".join(repr(n) for n in shown) + (f" (of {len(names)})" if len(names) > len(shown) else "")
    inside = [n for n in shown if prefix and in_base_model(n, prefix)]
    if inside:
        text += f"; from the base model {prefix!r} also spelled {inside[0][len(prefix) + 1 :]!r}"
    return text or "(none)"


def match_names(
    patterns: Sequence[str], names: Sequence[str], prefix: str, option: str, what: str = "module"
) -> dict[str, list[str]]:
    """The names (in ``names`` order) each pattern names (:func:`names_module`); a pattern that
    names none of them is an error naming ``option`` and a few valid names."""
    out: dict[str, list[str]] = {}
    for pattern in patterns:
        hits = [n for n in names if names_module(n, pattern, prefix)]
        if not hits:
            raise BergsonError(f"{option} {pattern!r} names no {what}; they are {some_names(names, prefix)}")
        out[pattern] = hits
    return out


def match_store_names(
    store_names: Sequence[str], store_prefix: str | None, names: Sequence[str], prefix: str
) -> dict[str, str]:
    """Map the module names of a store to the names of a model (or part of one): ``names`` are the
    part's module names and ``prefix`` its base model's (:func:`base_model_prefix`); the store's
    names are spelled from the model it was built from, whose base model sat at ``store_prefix``
    (None: not recorded). Tracing the model or its ``base_model`` finds the same modules, whichever
    way the store spells them. Store names with no counterpart are left out."""
    available = set(names)
    relative = {n[len(prefix) + 1 :]: n for n in names if prefix and in_base_model(n, prefix)}
    out: dict[str, str] = {}
    for s in store_names:
        rel = s[len(store_prefix) + 1 :] if store_prefix and in_base_model(s, store_prefix) else s
        for candidate in (s, rel):
            hit = candidate if candidate in available else relative.get(candidate)
            if hit is not None:
                out[s] = hit
                break
        else:
            if store_prefix is None:  # a store that does not record its base model: longest suffix
                hits = [n for n in names if n and s.endswith("." + n)]
                if hits:
                    out[s] = max(hits, key=len)
    return out


def resolve_heads(
    modules: Mapping[str, nn.Module],
    heads: Mapping[str, AttentionConfig] | Sequence[str] | None,
    prefix: str = "",
) -> dict[str, AttentionConfig]:
    """Map tracked module names to their head split, from exact names or glob patterns (or
    'PATTERN=NUM_HEADS:HEAD_SIZE:AXIS' strings), spelled from the whole model or from its base
    model at ``prefix``; every pattern must match a tracked module."""
    if not heads:
        return {}
    if not isinstance(heads, Mapping):
        heads = dict(AttentionConfig.parse(s) for s in heads)
    out: dict[str, AttentionConfig] = {}
    for pattern, cfg in heads.items():
        if not isinstance(cfg, AttentionConfig):
            raise BergsonError(
                f"attention heads {pattern!r}: expected an AttentionConfig, got {type(cfg).__name__}"
            )
        matched = [n for n in modules if names_module(n, pattern, prefix)]
        if not matched:
            raise BergsonError(
                f"attention heads {pattern!r} match no tracked module; tracked modules are "
                f"{some_names(list(modules), prefix)}"
            )
        for n in matched:
            if n in out and out[n] != cfg:
                raise BergsonError(f"module {n} is given two different attention head splits")
            out[n] = cfg
    return out


def layout_module(layout: Any) -> str:
    """The model module a store's column block (a ModuleLayout) belongs to: for an aggregated
    experts block, the fused parameter's name (its views are :func:`layout_modules`)."""
    return layout.head["module"] if layout.head else layout.name


def layout_modules(layout: Any) -> list[str]:
    """The modules whose gradients make a store's column block: the module (or the head's module),
    or every expert view summed into an aggregated experts block."""
    return list(getattr(layout, "experts", None) or [layout_module(layout)])


def heads_of(layouts: Sequence[Any]) -> dict[str, AttentionConfig]:
    """The attention-head splits recorded in a store's module layouts, per module."""
    out: dict[str, AttentionConfig] = {}
    for layout in layouts:
        if layout.head:
            h = layout.head
            size = h["stop"] - h["start"]
            out[h["module"]] = AttentionConfig(h["num_heads"], size, 0 if h["axis"] == "out" else 1)
    return out


def module_dims(module: nn.Module, projection_dim: int, include_bias: bool) -> int:
    """Length of one (unsplit) module's stored vector."""
    return module_blocks("", module, include_bias)[0].dim(projection_dim)


def column_layouts(
    modules: Mapping[str, nn.Module],
    projection_dim: int,
    include_bias: bool,
    heads: Mapping[str, AttentionConfig] | Sequence[str] | None = None,
    prefix: str = "",
    aggregate: bool = False,
) -> list[ModuleLayout]:
    """The column block of every tracked module (or of each of its attention heads), in tracking
    order, with its offset in the row: the one layout every store, result and loop uses. A head's
    ``shape`` is the head's own (rows x columns of the module it covers). ``prefix``: where the
    model's base model sits, for head patterns spelled from it (:func:`names_module`). ``aggregate``:
    every expert view of a fused parameter adds into one block of that parameter (p > 0 only)."""
    layouts: list[ModuleLayout] = []
    offset = 0
    split = resolve_heads(modules, heads, prefix)
    merged: dict[str, ModuleLayout] = {}  # aggregated expert columns
    for name, m in modules.items():
        for block in module_blocks(name, m, include_bias, split.get(name), aggregate):
            if block.column is not None and projection_dim == 0:
                raise BergsonError(
                    "--aggregate_experts needs --projection_dim > 0 (with full gradients the per-expert "
                    "blocks already lay out each fused parameter's gradient)"
                )
            if block.column in merged:
                into = merged[block.column]
                into.shape[0] += block.shape[0]
                into.experts = [*(into.experts or []), name]
                continue
            dim = block.dim(projection_dim)
            layout = ModuleLayout(
                block.col, type(m).__name__, list(block.shape), block.bias, offset, dim, block.head
            )
            if block.column is not None:
                layout.experts = [name]
                merged[block.column] = layout
            layouts.append(layout)
            offset += dim
    return layouts


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None  # type: ignore[assignment]
    return d


def _module_map(modules: list[dict[str, Any]]) -> dict[str, Any]:
    return {m["name"]: {"shape": m["shape"], "dim": m["dim"], "bias": m["bias"]} for m in modules}


VECTOR_FIELDS = ("model.name", "projection", "normalizer", "modules")
"""Fields that must agree for two sets of vectors to be compared (a preconditioner a store
carries is reconciled by the scorer, which applies what is still missing)."""


def check_layouts(a: dict[str, Any], b: dict[str, Any], a_name: str, b_name: str) -> None:
    """Fail, naming the field, when two vector layouts (manifest-like dicts) differ."""
    a = {**a, "modules": _module_map(a["modules"])}
    b = {**b, "modules": _module_map(b["modules"])}
    for key in VECTOR_FIELDS:
        va, vb = _get(a, key), _get(b, key)
        if va != vb:
            detail = describe_difference({key: va}, {key: vb}) if isinstance(va, (dict, list)) else []
            shown = "; ".join(detail[:3]) if detail else f"{va!r} != {vb!r}"
            raise BergsonError(
                f"{b_name} does not match {a_name}: {key} differs ({shown}); "
                "build both with the same model, modules, projection and normalizer"
            )
