"""Normalizers read from the optimizer state of a training run.

A Hugging Face ``Trainer`` checkpoint (``checkpoint-N/optimizer.pt``) or a file written by
``torch.save(optimizer.state_dict(), ...)`` holds the second moments the optimizer divided its
updates by. :func:`normalizers_from_optimizer_state` turns them into the normalizers of
:mod:`bergson.transforms.normalizers`, one per tracked module (per-example gradients normalized
as training normalized its updates); :func:`normalizers_from_optimizer` does the same from a live
optimizer (the Trainer callback); :func:`adam_second_moments` returns Adam's v̂ per parameter.
Supported optimizers (detected from the state of each weight):

* ``torch.optim.Adam`` / ``AdamW`` (``exp_avg_sq``): v̂ = exp_avg_sq / (1 - beta2**step)
  (``max_exp_avg_sq`` with ``amsgrad``), elementwise (:class:`AdamNormalizer`, with ``eps``).
* ``transformers.optimization.Adafactor`` (``exp_avg_sq_row`` / ``_col``; ``exp_avg_sq`` for
  vectors): v_ij = row_i col_j / mean(row) (:class:`AdafactorNormalizer`).
* ``torch.optim.Adafactor`` (``row_var`` / ``col_var``; ``variance`` for vectors):
  (row_var @ col_var) / max(mean(row_var), eps1) (:class:`AdafactorNormalizer`).

The state's parameter indices are mapped to names with the file's ``param_groups[i]["param_names"]``
or else by reconstructing the order of the optimizer's parameters (:func:`normalizers_from_optimizer_state`).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.experts import parameter_of
from ..core.layout import is_conv1d
from ..errors import BergsonError
from .normalizers import AdafactorNormalizer, AdamNormalizer, Normalizer

logger = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.pt"
"""The optimizer state file of a Hugging Face ``Trainer`` checkpoint directory."""

NORMALIZER_FORMS = ("auto", "adam", "rank_one")
"""``auto``: the optimizer's own form; ``adam``: elementwise; ``rank_one``: Adafactor form."""

_EXPECTED = (
    "a PyTorch optimizer state dict (a dict with 'state' and 'param_groups', as written by "
    "torch.save(optimizer.state_dict(), ...)) or a Hugging Face Trainer checkpoint directory "
    f"holding {OPTIMIZER_FILE}"
)

# Hugging Face Trainer decay / no-decay rules (``Trainer.get_decay_parameter_names``), newest first.
# A parameter is in the "decay" group unless it lives in an nn.LayerNorm or its lower-cased dotted
# name matches one of the patterns (searched on every suffix path, as transformers does).
_TRAINER_DECAY_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "Hugging Face Trainer decay/no-decay groups (transformers 5.x rule)",
        ("bias", "layernorm", "rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"),
    ),
    ("Hugging Face Trainer decay/no-decay groups (transformers 4.x rule)", ("bias", "layernorm", "rmsnorm")),
    ("Hugging Face Trainer decay/no-decay groups (older transformers rule)", ("bias",)),
)

# Prefixes that wrappers add to parameter names (DistributedDataParallel, torch.compile).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class _Entry:
    """The optimizer state of one parameter and the param group it belongs to."""

    index: int
    state: Mapping[str, Any]
    group: Mapping[str, Any]


def _part(entry: _Entry, part: Callable[[Any], Any]) -> _Entry:
    """The state of a module's part of its parameter (an expert's slice of a fused one)."""
    return _Entry(entry.index, {k: part(v) for k, v in entry.state.items()}, entry.group)


def normalizers_from_optimizer_state(
    path: str | Path,
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    *,
    form: str = "auto",
    include_bias: bool = False,
) -> dict[str, Normalizer]:
    """Build one normalizer per tracked module from a training run's optimizer state.

    Args:
        path: an ``optimizer.pt`` file (a Hugging Face ``Trainer`` checkpoint's, or one written
            by ``torch.save(optimizer.state_dict(), ...)``), or a directory holding
            ``optimizer.pt`` (a Trainer ``checkpoint-N`` directory).
        model: the trained model (the same architecture and, for index mapping, the same
            trainable parameters as during training; a PEFT model for adapter training).
        modules: the tracked modules ``{name: module}`` as returned by
            :func:`bergson.models.find_tracked_modules` for ``model``.
        form: ``"auto"`` keeps the optimizer's own form (Adam state gives an
            :class:`AdamNormalizer`, Adafactor state an :class:`AdafactorNormalizer`);
            ``"adam"`` always gives the elementwise :class:`AdamNormalizer` (for Adafactor
            state: its dense rank-one estimate); ``"rank_one"`` always gives an
            :class:`AdafactorNormalizer` (for Adam state: ``AdamNormalizer.to_adafactor()``,
            the row-sum / column-sum rank-one fit, which allows the cheap projected path).
        include_bias: also read the second moment of each module's bias (modules without a
            bias get none).

    Returns:
        ``{module name: normalizer}`` for every module in ``modules``; weights are in the
        "out x in" layout of ``nn.Linear.weight`` (GPT-2 ``Conv1D`` state is transposed).

    Mapping state indices to parameters: the names stored in the file are used when every
    param group has ``param_names``. Otherwise the order is reconstructed, trying (1) the
    Hugging Face ``Trainer`` grouping when there are two param groups (group 0: parameters
    that get weight decay, group 1: biases and norm parameters, each in ``named_parameters()``
    order) and (2) the plain ``named_parameters()`` order split by the group sizes. The
    parameters are the model's trainable ones (``requires_grad``); when those do not fit, a
    PEFT model's ``lora_`` parameters (an adapter loaded for inference is frozen) and then all
    parameters are tried. The first ordering whose group sizes and state tensor shapes all
    agree with the parameters is used.

    Biases under Adafactor: the bias is a vector with its own full second moment v_b, but an
    :class:`AdafactorNormalizer` can only express it as an extra rank-one column,
    v_b,i ≈ row_i * bias_col / sum(row). ``bias_col`` is chosen as sum(v_b), the fit that
    preserves the mean of v_b (the ratio-of-means fit: mean(v_b) / mean(row) scales the row
    factor). This is how Adafactor itself estimates a column factor (the column mean of the
    squared gradient), and matches the bias column of ``AdamNormalizer.to_adafactor()``; it
    is exact only when v_b is proportional to the row factor. ``form="adam"`` keeps v_b
    exactly.

    Raises:
        BergsonError: a missing file, a file that is not an optimizer state dict, an unknown
            ``form``, a state that does not fit ``model`` (naming the parameter, expected and
            found shapes), a tracked module (or requested bias) without optimizer state, or
            an unsupported optimizer.
    """
    if form not in NORMALIZER_FORMS:
        raise BergsonError(f"--normalizer_form {form!r}: choose one of {', '.join(NORMALIZER_FORMS)}")
    file, lookup = _module_entries(path, model, modules)
    out: dict[str, Normalizer] = {}
    for module_name, module in modules.items():
        weight_entry, weight = lookup(module_name, "weight")
        bias_entry = None
        if include_bias and getattr(module, "bias", None) is not None:
            bias_entry, _ = lookup(module_name, "bias")
        out[module_name] = _normalizer(
            module_name, weight_entry, bias_entry, is_conv1d(module), weight.dtype, form, file
        )
    return out


def _module_entries(
    path: str | Path, model: nn.Module, modules: Mapping[str, nn.Module]
) -> tuple[Path, Callable[[str, str], tuple[_Entry, torch.Tensor]]]:
    """The optimizer state file and a lookup (module name, "weight" | "bias") -> (that parameter's
    entry, the parameter), refusing parameters the file holds no state for."""
    file = _resolve_file(path)
    entries = _map_entries(_load_state_dict(file), model, file)
    param_names = {id(p): n for n, p in model.named_parameters()}

    def lookup(module_name: str, param: str) -> tuple[_Entry, torch.Tensor]:
        tensor, part = parameter_of(modules[module_name], param)
        if not isinstance(tensor, torch.Tensor):
            raise BergsonError(f"module {module_name!r} has no {param} parameter to read optimizer state for")
        name = param_names.get(id(tensor))
        if name is None:
            raise BergsonError(
                f"module {module_name!r}: its {param} is not a parameter of the model given "
                "(pass the modules found in the same model object)"
            )
        entry = entries.get(name)
        if entry is None:
            raise BergsonError(
                f"{file}: no optimizer state for module {module_name!r} (parameter {name!r}): it was "
                "frozen or unused during training, or the state belongs to another model; "
                "track only the trained modules (--modules)"
            )
        return _part(entry, part), tensor

    return file, lookup


def param_groups_of(
    path: str | Path, model: nn.Module, modules: Mapping[str, nn.Module], include_bias: bool = False
) -> dict[str, tuple[Mapping[str, Any], Mapping[str, Any] | None]]:
    """Per tracked module, the hyperparameters (``weight_decay``, ``betas``, ...) of its weight's param
    group and of its bias's (None without ``include_bias`` or a bias), mapped as
    :func:`normalizers_from_optimizer_state` maps the state."""
    _, lookup = _module_entries(path, model, modules)

    def hyper(name: str, param: str) -> Mapping[str, Any]:
        return {k: v for k, v in lookup(name, param)[0].group.items() if k not in ("params", "param_names")}

    biased = {n for n, m in modules.items() if include_bias and getattr(m, "bias", None) is not None}
    return {n: (hyper(n, "weight"), hyper(n, "bias") if n in biased else None) for n in modules}


def normalizers_from_optimizer(
    optimizer: Any,
    modules: Mapping[str, nn.Module],
    *,
    form: str = "auto",
    include_bias: bool = False,
    source: str = "the optimizer",
) -> dict[str, Normalizer] | None:
    """Normalizers from a live optimizer, built exactly as :func:`normalizers_from_optimizer_state`
    builds them from a saved state dict (same optimizers, ``form`` and bias handling).

    The state is looked up by parameter object, so no index mapping is needed; an
    ``accelerate`` ``AcceleratedOptimizer`` is unwrapped. Returns None while the optimizer holds
    no state for any tracked weight (before its first step). The normalizers may share tensors
    with the optimizer's state: use them before its next step. ``source`` names the optimizer
    in error messages.
    """
    if form not in NORMALIZER_FORMS:
        raise BergsonError(f"normalizer_form {form!r}: choose one of {', '.join(NORMALIZER_FORMS)}")
    opt = getattr(optimizer, "optimizer", optimizer)
    where: dict[int, tuple[int, Mapping[str, Any]]] = {}
    for group in opt.param_groups:
        for param in group["params"]:
            where[id(param)] = (len(where), group)

    def lookup(module_name: str, param: str) -> tuple[torch.Tensor, _Entry | None]:
        tensor, part = parameter_of(modules[module_name], param)
        if not isinstance(tensor, torch.Tensor) or id(tensor) not in where:
            raise BergsonError(
                f"{source}: the {param} of module {module_name!r} is not among the optimized parameters "
                "(frozen?); track only the trained modules"
            )
        index, group = where[id(tensor)]
        state = opt.state.get(tensor)
        return tensor, _part(_Entry(index, state, group), part) if state else None

    weights = {name: lookup(name, "weight") for name in modules}
    if all(entry is None for _, entry in weights.values()):
        return None
    out: dict[str, Normalizer] = {}
    for module_name, (weight, weight_entry) in weights.items():
        bias_entry = None
        if include_bias and getattr(modules[module_name], "bias", None) is not None:
            _, bias_entry = lookup(module_name, "bias")
            if bias_entry is None:
                weight_entry = None
        if weight_entry is None:
            raise BergsonError(
                f"{source}: no optimizer state for module {module_name!r} while other modules have "
                "some: it received no gradient in the optimizer steps so far"
            )
        out[module_name] = _normalizer(
            module_name,
            weight_entry,
            bias_entry,
            is_conv1d(modules[module_name]),
            weight.dtype,
            form,
            source,
        )
    return out


# ---------------------------------------------------------------------------------------------
# Loading


def _resolve_file(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        file = p / OPTIMIZER_FILE
        if not file.is_file():
            raise BergsonError(
                f"{p}: no {OPTIMIZER_FILE} in this directory; expected {_EXPECTED} "
                "(DeepSpeed and FSDP sharded optimizer states are not supported)"
            )
        return file
    if not p.is_file():
        raise BergsonError(f"{p}: no such file or directory; expected {_EXPECTED}")
    return p


def _load_state_dict(file: Path) -> Mapping[str, Any]:
    """The file's state dict, memory-mapped where torch's format allows it (tensors are read only
    when used, so reading just the param groups costs little); a legacy-format file is read whole."""
    try:
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # not mappable (legacy format, or unreadable: the plain load says which)
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types (pickle, zip, runtime errors)
        text = str(e)
        if "Weights only load failed" in text:
            reason = "it holds objects other than tensors and plain Python values, which are not loaded"
        else:
            lines = text.strip().splitlines()
            reason = (lines[0] if lines else type(e).__name__)[:200]
        raise BergsonError(
            f"{file}: cannot be read as a PyTorch file ({reason}); expected {_EXPECTED}"
        ) from e
    problem = _state_dict_problem(obj)
    if problem:
        raise BergsonError(f"{file} is not an optimizer state dict ({problem}); expected {_EXPECTED}")
    return obj


def _state_dict_problem(obj: Any) -> str | None:
    if not isinstance(obj, Mapping):
        return f"it holds a {type(obj).__name__}"
    missing = [k for k in ("state", "param_groups") if k not in obj]
    if missing:
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        return f"no {' or '.join(repr(k) for k in missing)} key; its keys are {keys or 'none'}"
    if not isinstance(obj["state"], Mapping):
        return "'state' is not a dict"
    groups = obj["param_groups"]
    if not isinstance(groups, Sequence) or not all(
        isinstance(g, Mapping) and isinstance(g.get("params"), Sequence) for g in groups
    ):
        return "'param_groups' is not a list of dicts with 'params'"
    return None


# ---------------------------------------------------------------------------------------------
# Mapping state indices to parameter names


def _map_entries(state_dict: Mapping[str, Any], model: nn.Module, file: Path) -> dict[str, _Entry]:
    """``{parameter name: entry}`` under the first candidate ordering that fits the model."""
    groups: list[Mapping[str, Any]] = list(state_dict["param_groups"])
    states = {int(k): v for k, v in state_dict["state"].items()}
    params = dict(model.named_parameters())
    tried: list[str] = []
    seen: set[tuple[tuple[str, ...], ...]] = set()
    for label, names in _candidates(groups, model, params):
        key = tuple(tuple(g) for g in names)
        if key in seen:
            continue
        seen.add(key)
        mapping, problem = _check(groups, states, names, params)
        if mapping is not None:
            logger.info("%s: optimizer state indices mapped with %s", file, label)
            return mapping
        tried.append(f"{label}: {problem}")
    sizes = ", ".join(str(len(g["params"])) for g in groups)
    raise BergsonError(
        f"{file}: the optimizer state does not match the model's parameters; it probably belongs to "
        f"another model (or to another set of trainable parameters). {len(groups)} param group(s) of "
        f"sizes [{sizes}], {len(states)} state entries. Tried: " + "; ".join(tried)
    )


def _candidates(
    groups: Sequence[Mapping[str, Any]], model: nn.Module, params: Mapping[str, torch.Tensor]
) -> list[tuple[str, list[list[str]]]]:
    """Candidate parameter names per group, most specific first."""
    out: list[tuple[str, list[list[str]]]] = []
    if groups and all("param_names" in g for g in groups):
        stored = [[_strip_wrappers(str(n), params) for n in g["param_names"]] for g in groups]
        out.append(("the parameter names stored in the optimizer state", stored))
    sizes = [len(g["params"]) for g in groups]
    trainable = [n for n, p in params.items() if p.requires_grad]
    param_sets = [("trainable parameters", trainable)]
    if hasattr(model, "peft_config"):
        param_sets.append(("PEFT adapter parameters", [n for n in params if "lora_" in n]))
    param_sets.append(("all parameters", list(params)))
    decay_rules: list[tuple[str, set[str]]] = []
    if len(groups) == 2:
        decay_rules = [(label, set(_decay_parameter_names(model, p))) for label, p in _TRAINER_DECAY_RULES]
    for set_label, names in param_sets:
        for rule_label, decay in decay_rules:
            split = [[n for n in names if n in decay], [n for n in names if n not in decay]]
            out.append((f"{rule_label} over the {set_label}", split))
        # consecutive chunks of the group sizes; the last group takes whatever is left
        chunks: list[list[str]] = []
        start = 0
        for i, size in enumerate(sizes):
            end = len(names) if i == len(sizes) - 1 else start + size
            chunks.append(names[start:end])
            start = end
        out.append((f"plain named_parameters() order of the {set_label}", chunks))
    return out


def _strip_wrappers(name: str, params: Mapping[str, torch.Tensor]) -> str:
    while name not in params and name.startswith(_WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def _decay_parameter_names(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """``transformers.trainer_pt_utils.get_parameter_names(model, [nn.LayerNorm], patterns)``."""
    compiled = [re.compile(p) for p in patterns]

    def allowed(name: str) -> bool:
        return not any(c.search(name.lower()) for c in compiled)

    def walk(module: nn.Module) -> list[str]:
        result: list[str] = []
        for child_name, child in module.named_children():
            if isinstance(child, nn.LayerNorm):
                continue
            result += [f"{child_name}.{n}" for n in walk(child) if allowed(f"{child_name}.{n}")]
        result += [k for k in module._parameters if allowed(k)]
        return result

    return walk(model)


def _check(
    groups: Sequence[Mapping[str, Any]],
    states: Mapping[int, Any],
    names: Sequence[Sequence[str]],
    params: Mapping[str, torch.Tensor],
) -> tuple[dict[str, _Entry] | None, str]:
    """The mapping if ``names`` fits the groups and every state tensor's shape, else the reason."""
    if len(names) != len(groups) or any(len(n) != len(g["params"]) for n, g in zip(names, groups)):
        found = ", ".join(str(len(n)) for n in names)
        return None, f"these give group sizes [{found}]"
    mapping: dict[str, _Entry] = {}
    for group, group_names in zip(groups, names):
        for index, name in zip(group["params"], group_names):
            param = params.get(name)
            if param is None:
                return None, f"parameter {name!r} (index {index}) is not a parameter of this model"
            state = states.get(int(index))
            if state is None:
                continue
            if not isinstance(state, Mapping):
                return None, f"the state of index {index} is a {type(state).__name__}, not a dict"
            shape = tuple(param.shape)
            for key, value in state.items():
                if not isinstance(value, torch.Tensor) or value.ndim == 0:
                    continue
                expected = _expected_shape(str(key), shape)
                if expected is not None and tuple(value.shape) != expected:
                    return None, (
                        f"parameter {name!r} (index {index}, shape {shape}) expects {key} of shape "
                        f"{expected}, found shape {tuple(value.shape)}"
                    )
            mapping[name] = _Entry(int(index), state, group)
    return mapping, ""


def _expected_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape of optimizer state ``key`` for a parameter of ``shape`` (None: not checked)."""
    if key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "variance", "momentum_buffer", "square_avg"):
        return shape
    if len(shape) < 2:
        return None
    if key == "exp_avg_sq_row":
        return shape[:-1]
    if key == "exp_avg_sq_col":
        return shape[:-2] + shape[-1:]
    if key == "row_var":
        return (*shape[:-1], 1)
    if key == "col_var":
        return (*shape[:-2], 1, shape[-1])
    return None


# ---------------------------------------------------------------------------------------------
# Building normalizers


def _float(t: torch.Tensor) -> torch.Tensor:
    # a state dict read from a file is on the CPU already; a live optimizer's state stays on its device
    t = t.detach()
    return t if t.dtype == torch.float64 else t.float()


def _scalar(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


@dataclass
class _RankOne:
    """v = outer(a, b) * scale with a over outputs, b over inputs; ``floor`` is the variance floor."""

    a: torch.Tensor
    b: torch.Tensor
    scale: torch.Tensor
    floor: float

    def dense(self) -> torch.Tensor:
        return torch.outer(self.a, self.b) * self.scale

    def normalizer(self, bias: torch.Tensor | None) -> AdafactorNormalizer:
        # dense() of AdafactorNormalizer is outer(row, col) / sum(row): fold the rest into col.
        col = self.b * self.scale * self.a.sum()
        bias_col = None if bias is None else bias.sum()
        return AdafactorNormalizer(row=self.a, col=col, bias_col=bias_col, eps=self.floor)


def _normalizer(
    module_name: str,
    weight: _Entry,
    bias: _Entry | None,
    conv1d: bool,
    dtype: torch.dtype,
    form: str,
    file: str | Path,
) -> Normalizer:
    state = weight.state
    if "exp_avg_sq_row" in state and "exp_avg_sq_col" in state:
        rank_one = _hf_adafactor(weight, conv1d)
        bias_v = None if bias is None else _vector_moment(bias, "exp_avg_sq", module_name, file)
    elif "row_var" in state and "col_var" in state:
        rank_one = _torch_adafactor(weight, conv1d, dtype)
        bias_v = None if bias is None else _vector_moment(bias, "variance", module_name, file)
    elif "exp_avg_sq" in state:
        v = _adam_moment(weight)
        if v.ndim != 2:
            raise BergsonError(f"{file}: module {module_name!r}: weight second moment is not a matrix")
        adam = AdamNormalizer(
            weight=v.T.contiguous() if conv1d else v,
            bias=None if bias is None else _adam_moment(_require(bias, "exp_avg_sq", module_name, file)),
            eps=_scalar(weight.group.get("eps", 1e-8)),
        )
        return adam.to_adafactor() if form == "rank_one" else adam
    else:
        keys = ", ".join(sorted(map(str, state))) or "none"
        raise BergsonError(
            f"{file}: module {module_name!r}: unsupported optimizer state (keys: {keys}); supported: "
            "torch Adam/AdamW (exp_avg_sq), Hugging Face Adafactor (exp_avg_sq_row/col), "
            "torch Adafactor (row_var/col_var)"
        )
    if form == "adam":
        return AdamNormalizer(weight=rank_one.dense(), bias=bias_v, eps=math.sqrt(rank_one.floor))
    return rank_one.normalizer(bias_v)


def _require(entry: _Entry, key: str, module_name: str, file: str | Path) -> _Entry:
    if key not in entry.state:
        keys = ", ".join(sorted(map(str, entry.state))) or "none"
        raise BergsonError(
            f"{file}: module {module_name!r}: the bias state has no {key!r} (keys: {keys}); "
            "weight and bias were trained by different optimizers?"
        )
    return entry


def _vector_moment(entry: _Entry, key: str, module_name: str, file: str | Path) -> torch.Tensor:
    """An Adafactor optimizer's unfactored (vector) second moment; no bias correction is needed."""
    return _float(_require(entry, key, module_name, file).state[key])


def _adam_moment(entry: _Entry) -> torch.Tensor:
    """Adam's bias-corrected second moment exp_avg_sq / (1 - beta2**step).

    With ``amsgrad`` the running maximum ``max_exp_avg_sq`` is what Adam divides by. A state
    without ``step`` or a group without ``betas`` is used uncorrected.
    """
    state, group = entry.state, entry.group
    key = "max_exp_avg_sq" if group.get("amsgrad") and "max_exp_avg_sq" in state else "exp_avg_sq"
    v = _float(state[key])
    betas, step = group.get("betas"), state.get("step")
    if betas is None or step is None:
        logger.warning(
            "optimizer state index %d has no step or betas: its second moment is used as is", entry.index
        )
        return v
    step_f = _scalar(step)
    if step_f <= 0:
        return v
    return v / (1.0 - float(betas[1]) ** step_f)


def _hf_adafactor(entry: _Entry, conv1d: bool) -> _RankOne:
    """``transformers.optimization.Adafactor``: v = outer(row, col) / mean(row) over the weight as
    stored (row over its first dim, col over its last); eps[0] is already inside the moments."""
    row = _float(entry.state["exp_avg_sq_row"])
    col = _float(entry.state["exp_avg_sq_col"])
    scale = 1.0 / row.mean()
    eps = entry.group.get("eps", (1e-30, 1e-3))
    floor = float(eps[0]) if isinstance(eps, Sequence) else _scalar(eps)
    a, b = (col, row) if conv1d else (row, col)
    return _RankOne(a=a, b=b, scale=scale, floor=floor)


def _torch_adafactor(entry: _Entry, conv1d: bool, dtype: torch.dtype) -> _RankOne:
    """``torch.optim.Adafactor``: v = (row_var @ col_var) / max(mean(row_var), eps1), then clamped
    below at eps1**2 (eps1 defaults to the parameter dtype's machine epsilon)."""
    row = _float(entry.state["row_var"]).squeeze(-1)
    col = _float(entry.state["col_var"]).squeeze(-2)
    eps = entry.group.get("eps", (None, 1e-3))
    eps1 = eps[0] if isinstance(eps, Sequence) else None
    eps1 = torch.finfo(dtype).eps if eps1 is None else float(eps1)
    scale = 1.0 / row.mean().clamp(min=eps1)
    a, b = (col, row) if conv1d else (row, col)
    return _RankOne(a=a, b=b, scale=scale, floor=eps1 * eps1)


def adam_second_moments(path: str | Path, model: nn.Module) -> dict[str, tuple[torch.Tensor, float]]:
    """Adam's v̂ and eps per parameter name, from a state file or directory matched to ``model``."""
    file = _resolve_file(path)
    entries = _map_entries(_load_state_dict(file), model, file)
    if missing := [name for name, e in entries.items() if "exp_avg_sq" not in e.state]:
        raise BergsonError(f"{file}: parameter {missing[0]} has no exp_avg_sq: this is not Adam's state")
    return {name: (_adam_moment(e), float(e.group.get("eps", 1e-8))) for name, e in entries.items()}
