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
from .files import describe_difference


@dataclass(frozen=True)
class AttentionConfig:
    """How one module's gradient splits into attention heads: ``num_heads`` consecutive blocks of
    ``head_size`` features along axis ``head_dim`` of the (out x in) weight.

    ``head_dim=0`` splits the output axis (rows): query, key and value projections, and fused qkv
    layers whose rows are grouped per head (GPT-NeoX). ``head_dim=1`` splits the input axis
    (columns): the attention output projection, whose inputs are the concatenated heads.
    ``num_heads * head_size`` must equal the size of that axis.
    """

    num_heads: int
    head_size: int
    head_dim: int = 0

    @classmethod
    def parse(cls, spec: str) -> tuple[str, AttentionConfig]:
        """``'PATTERN=NUM_HEADS:HEAD_SIZE:AXIS'`` (AXIS: out, in, 0 or 1) -> (pattern, config)."""
        pattern, _, rest = spec.partition("=")
        parts = rest.split(":")
        axes = {"out": 0, "0": 0, "in": 1, "1": 1}
        if not pattern or len(parts) != 3 or parts[2] not in axes or not all(p.isdigit() for p in parts[:2]):
            raise BergsonError(
                f"--attention_heads {spec!r}: expected MODULE_PATTERN=NUM_HEADS:HEAD_SIZE:AXIS with AXIS "
                "out (heads on the output rows: q/k/v, fused qkv) or in (heads on the input columns: "
                "the attention output projection), e.g. 'gpt_neox.layers.*.attention.dense=4:16:in'"
            )
        return pattern, cls(int(parts[0]), int(parts[1]), axes[parts[2]])


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

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows.stop - self.rows.start, self.cols.stop - self.cols.start

    def dim(self, projection_dim: int) -> int:
        """Length of the block's stored vector."""
        if projection_dim > 0:
            return projection_dim * projection_dim
        out, n_in = self.shape
        return out * n_in + (out if self.bias else 0)


def module_blocks(
    name: str, module: nn.Module, include_bias: bool, heads: AttentionConfig | None = None
) -> list[Block]:
    """The column blocks of a tracked module: itself, or one block per attention head named
    ``'{name}.head{h}'``. Heads must tile their axis exactly."""
    out, n_in = module_shape(module)
    has_bias = include_bias and getattr(module, "bias", None) is not None
    if heads is None:
        return [Block(name, name, slice(0, out), slice(0, n_in), has_bias)]
    axis = "out" if heads.head_dim == 0 else "in"
    size = out if heads.head_dim == 0 else n_in
    if heads.head_dim not in (0, 1) or heads.num_heads < 1 or heads.num_heads * heads.head_size != size:
        raise BergsonError(
            f"attention heads of {name}: {heads.num_heads} heads x {heads.head_size} features on axis "
            f"{heads.head_dim} do not cover it: the layer is {out} (out) x {n_in} (in), so the heads of "
            f"its {axis} axis must multiply to {size}"
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


def resolve_heads(
    modules: Mapping[str, nn.Module], heads: Mapping[str, AttentionConfig] | Sequence[str] | None
) -> dict[str, AttentionConfig]:
    """Map tracked module names to their head split, from exact names or glob patterns (or
    'PATTERN=NUM_HEADS:HEAD_SIZE:AXIS' strings); every pattern must match a tracked module."""
    if not heads:
        return {}
    if not isinstance(heads, Mapping):
        heads = dict(AttentionConfig.parse(s) for s in heads)
    out: dict[str, AttentionConfig] = {}
    for pattern, cfg in heads.items():
        matched = [n for n in modules if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise BergsonError(
                f"attention heads {pattern!r} match no tracked module; tracked modules look like "
                f"{next(iter(modules), '(none)')!r}"
            )
        for n in matched:
            if n in out and out[n] != cfg:
                raise BergsonError(f"module {n} is given two different attention head splits")
            out[n] = cfg
    return out


def layout_module(layout: Any) -> str:
    """The model module a store's column block (a ModuleLayout) belongs to."""
    return layout.head["module"] if layout.head else layout.name


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
) -> list[ModuleLayout]:
    """The column block of every tracked module (or of each of its attention heads), in tracking
    order, with its offset in the row: the one layout every store, result and loop uses. A head's
    ``shape`` is the head's own (rows x columns of the module it covers)."""
    layouts, offset = [], 0
    split = resolve_heads(modules, heads)
    for name, m in modules.items():
        for block in module_blocks(name, m, include_bias, split.get(name)):
            dim = block.dim(projection_dim)
            layouts.append(
                ModuleLayout(
                    block.name, type(m).__name__, list(block.shape), block.bias, offset, dim, block.head
                )
            )
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
