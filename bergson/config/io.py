"""Configs as plain data: from YAML and dicts (unknown keys refused, other spellings accepted), to YAML.

Besides its own spelling, bergson reads the option names of the original ``bergson`` package
(its nested ``index_cfg.``/``distributed.`` groups, MAGIC's flat recipe keys such as
``batch_size``, ``num_epochs`` and ``lr_schedule``), in YAML, in dicts and on the command line,
through the one table :data:`ALIASES`. YAML files may also be pipelines: a top-level ``steps:``
list of one-key mappings ``{command: {options}}`` (:func:`read_steps`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

from ..errors import BergsonError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Alias:
    """How one option of another spelling is read.

    ``to``: our option (dotted for a nested group; for a key ending in ``.``, the prefix that
    replaces it). ``values``: the values it may take, translated to ours (a value not listed is
    refused). Without ``to``: ``accepted`` are the values that equal what bergson always does
    (others are refused), or ``ignored`` says why it has no effect here (announced, recorded).
    ``recipe``: the key belongs to the original's MAGIC recipe, whose defaults then apply
    (:data:`ORIGINAL_RECIPE_DEFAULTS`).
    """

    to: str = ""
    values: Mapping[Any, Any] | None = None
    accepted: tuple[Any, ...] = ()
    ignored: str = ""
    recipe: bool = False
    why: str = ""
    open_values: bool = False
    """``values`` translates the values it lists and passes others through (instead of refusing)."""


_SCHEDULES = {"constant": "constant", "constant_with_warmup": "constant", "linear": "linear"}
_SCHEDULES |= {"cosine": "cosine", "cosine_with_restarts": "cosine", "polynomial": "polynomial"}

ALIASES: dict[str, Alias] = {
    # any command
    "unit_norm": Alias("unit_normalize"),
    "index_cfg.": Alias(""),  # the original nests a build's options under index_cfg
    "preprocess_cfg.": Alias(""),
    "distributed.nproc_per_node": Alias("nproc_per_node"),
    "distributed.nnode": Alias(accepted=(1,), why="bergson starts workers on one machine"),
    "distributed.node_rank": Alias(accepted=(None, 0), why="bergson starts workers on one machine"),
    "wandb_project": Alias(ignored="bergson logs to the console and the run directory, not to Weights & Biases"),
    "attribute_tokens": Alias("per_token"),
    "data_kwargs": Alias("data.data_args"),  # the original's name of --data_args (2.5)
    "data.data_kwargs": Alias("data.data_args"),
    "query.data_kwargs": Alias("query.data_args"),
    # query
    "faiss": Alias("search", values={True: "faiss", False: "exact"}),
    "faiss_cfg.": Alias("faiss."),
    # MAGIC: the original spells the recipe flat, the query set as query.data, the checkpoints save_mode
    "query.data.": Alias("query."),
    "query.aggregation": Alias("query_mode", values={"none": "individual", "mean": "aggregate"}, recipe=True),
    "batch_size": Alias("training.batch_size", recipe=True),  # per step: divided by grad_accum_steps
    "grad_accum_steps": Alias("training.grad_accumulation", recipe=True),
    "num_epochs": Alias("training.epochs", recipe=True),
    "seed": Alias("training.seed", recipe=True),
    "optimizer": Alias("training.optimizer", values={"adamw": "adamw", "sgd": "sgd"}, recipe=True),
    "adam_beta1": Alias("training.beta1", recipe=True),
    "adam_beta2": Alias("training.beta2", recipe=True),
    "adam_eps": Alias("training.eps", recipe=True),
    "eps_root": Alias("training.eps_root", recipe=True),
    "weight_decay": Alias("training.weight_decay", recipe=True),
    "max_grad_norm": Alias("training.max_grad_norm", values={None: 0.0}, open_values=True, recipe=True),
    "lr_schedule.lr": Alias("training.lr", recipe=True),
    "lr_schedule.lr_scheduler_type": Alias("training.schedule", values=_SCHEDULES, recipe=True),
    "lr_schedule.lr_start": Alias("training.lr_start", recipe=True),
    "lr_schedule.lr_end": Alias("training.lr_end", recipe=True),
    "lr_schedule.warmup_steps": Alias("training.warmup_steps", recipe=True),
    "lr_schedule.power": Alias("training.power", recipe=True),
    "lr_schedule.num_cycles": Alias(accepted=(0.5,), why="bergson's cosine is one half-cosine decay"),
    "save_mode": Alias("checkpoints", values={"all": "every", "sqrt": "sqrt", "log": "log"}),
    "double_backward_batch_size": Alias(
        ignored="it bounds the memory of the original's reverse pass and does not change its scores; "
        "bergson differentiates one micro-batch (batch_size / grad_accum_steps documents) at a time"
    ),
    "loss_reduction": Alias(accepted=("mean",), why="a step's loss is the mean over its loss tokens"),
    "train_mode": Alias(accepted=(False,), why="bergson replays training in eval mode (no dropout)"),
    "grad_checkpointing": Alias(accepted=(False,), why="bergson's replay does not recompute activations"),
    "skip_validation": Alias(accepted=(True,), why="validate the scores with `bergson validate`"),
    "resume": Alias(ignored="bergson always resumes a run made with the same options (overwrite: true starts over)"),
    "save_models": Alias(ignored="bergson always saves the fine-tuned model under RUN_PATH/model"),
}  # fmt: skip
"""Other spellings of options (old ones, and the original package's), by dotted key; a key ending
in ``.`` is a prefix. An alias is used only where the key is not an option of the command and its
target is."""

ORIGINAL_RECIPE_DEFAULTS: dict[str, Any] = {
    "training.batch_size": 16,
    "training.seed": 42,
    "training.beta1": 0.95,
    "training.beta2": 0.975,
    "training.eps_root": 1e-17,
    "training.weight_decay": 0.01,
    "training.lr": 1e-5,
    "training.schedule": "linear",
    "query_mode": "individual",
}
"""The original package's MAGIC defaults, used for a recipe written in its spelling (whose author
relied on them) where it leaves a key out."""

_T = TypeVar("_T")


@dataclass
class Translation:
    """Options read in another spelling: ours, what was announced, and whether debug was asked."""

    values: dict[str, Any]
    notes: list[str]
    debug: bool = False


def leaf_options(cls: type, prefix: str = "") -> set[str]:
    """Our options of config class ``cls`` as dotted names (nested groups' fields included)."""
    out = set()
    hints = get_type_hints(cls)
    for f in fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and is_dataclass(tp):
            out |= leaf_options(tp, f"{prefix}{f.name}.")
        else:
            out.add(prefix + f.name)
    return out


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``values`` with nested mappings as dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``)."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, Mapping) and v:
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[prefix + str(k)] = v
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in flat.items():
        *groups, name = key.split(".")
        node = out
        for g in groups:
            node = node.setdefault(g, {})
            if not isinstance(node, dict):
                raise BergsonError(f"option {g} is given both as a value and as a group ({key})")
        node[name] = v
    return out


def strip_prefixes(key: str, ours: set[str]) -> str:
    """``key`` with the original's group prefixes (``index_cfg.``, ...) replaced by ours."""
    changed = True
    while changed and key not in ours:
        changed = False
        for prefix, alias in ALIASES.items():
            if prefix.endswith(".") and key.startswith(prefix):
                key, changed = alias.to + key[len(prefix) :], True
                break
    return key


def translate(cls: type, values: Mapping[str, Any], where: str = "config") -> Translation:
    """Read ``values`` (nested or dotted keys, any spelling of :data:`ALIASES`) as options of ``cls``:
    returns them in our spelling (nested), with the announcements made (ignored options, the
    original's recipe defaults). A value an alias cannot take is refused."""
    ours = leaf_options(cls)
    tops = {f.name for f in fields(cls)}
    out: dict[str, Any] = {}
    notes: list[str] = []
    debug, recipe, step_batch, own_training = False, False, None, False
    for raw, value in flatten(values).items():
        key = strip_prefixes(raw, ours)
        if key in ours or (
            key.split(".")[0] in tops and key.split(".")[0] not in ours and key not in ALIASES
        ):
            own_training |= key.startswith("training.")
            out[key] = value
            continue
        if key == "debug" and "debug" not in tops:
            debug = bool(value)
            continue
        alias = ALIASES.get(key)
        if alias is None or (alias.to and alias.to.split(".")[0] not in tops):
            out[key] = value  # from_dict names it as unknown
            continue
        recipe |= alias.recipe
        if alias.ignored:
            notes.append(f"{raw}={value!r} is ignored: {alias.ignored}")
        elif not alias.to:
            if value not in alias.accepted:
                choices = " or ".join(repr(a) for a in alias.accepted)
                raise BergsonError(f"{where}: {raw}={value!r} is not supported ({alias.why}); use {choices}")
        elif alias.values is not None and value not in alias.values and not alias.open_values:
            choices = ", ".join(repr(a) for a in alias.values)
            raise BergsonError(
                f"{where}: {raw}={value!r} has no counterpart in bergson; use one of {choices}"
            )
        else:
            if alias.values is not None and value in alias.values:
                value = alias.values[value]
            if raw == "batch_size":
                step_batch = value
                continue
            out[alias.to] = value
            logger.debug("%s: %s read as %s", where, raw, alias.to)
    if recipe and "training" in tops:
        if own_training:
            raise BergsonError(
                f"{where}: mixes the original package's recipe keys (batch_size, num_epochs, lr_schedule, ...) "
                "with bergson's training.* options; write the recipe in one spelling"
            )
        defaults = {k: v for k, v in ORIGINAL_RECIPE_DEFAULTS.items() if k not in out}
        if step_batch is not None:
            defaults.pop("training.batch_size")
        accum = out.get("training.grad_accumulation", 1)
        batch = ORIGINAL_RECIPE_DEFAULTS["training.batch_size"] if step_batch is None else step_batch
        if not isinstance(batch, int) or not isinstance(accum, int) or accum < 1 or batch % accum:
            raise BergsonError(
                f"{where}: batch_size {batch} is the documents of an optimizer step, split into grad_accum_steps "
                f"{accum} micro-batches; it must be a multiple of grad_accum_steps"
            )
        out |= defaults
        out["training.batch_size"] = batch // accum
        if defaults:
            shown = ", ".join(f"{k}={v}" for k, v in defaults.items())
            notes.append(f"a recipe in the original package's spelling takes its defaults: {shown}")
        if accum > 1:
            notes.append(
                f"batch_size {batch} with grad_accum_steps {accum}: training.batch_size {batch // accum}"
            )
    return Translation(_unflatten(out), notes, debug)


def _convert(tp: Any, value: Any, where: str, notes: list[str] | None) -> Any:
    """Convert a YAML value to the annotated field type (nested dataclasses included)."""
    if isinstance(tp, type) and is_dataclass(tp):
        if not isinstance(value, dict):
            raise BergsonError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    origin = get_origin(tp)
    numbers = [t for t in (get_args(tp) or (tp,)) if t in (int, float)]
    if numbers and isinstance(value, str) and str not in get_args(tp):
        try:  # YAML 1.1 reads 1e-6 (no dot) as a string
            return numbers[-1](value)
        except ValueError:
            raise BergsonError(f"{where}: expected a number, got {value!r}") from None
    if float in numbers and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is list and isinstance(value, list):
        (inner,) = get_args(tp) or (Any,)
        return [_convert(inner, v, where, notes) for v in value]
    return value


def _build(cls: type[_T], values: dict[str, Any], where: str) -> _T:
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise BergsonError(
            f"{where}: unknown option(s) {', '.join(unknown)}; valid options are {', '.join(sorted(known))}"
        )
    return cls(**{k: _convert(hints[k], v, f"{where}.{k}", None) for k, v in values.items()})


def from_dict(
    cls: type[_T], values: Mapping[str, Any], where: str = "config", notes: list[str] | None = None
) -> _T:
    """Build a config dataclass from a (possibly nested) dict in any spelling of :data:`ALIASES`,
    rejecting unknown keys; announcements are logged (and appended to ``notes``)."""
    assert is_dataclass(cls)
    tr = translate(cls, values, where)
    for note in tr.notes:
        logger.warning("%s: %s", where, note)
    if notes is not None:
        notes += tr.notes
    return _build(cls, tr.values, where)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML config file holds."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise BergsonError(f"--config: no such file {p}")
    try:
        values = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise BergsonError(f"--config: {p} is not valid YAML: {e}") from e
    if not isinstance(values, dict):
        raise BergsonError(f"--config: {p} must hold a mapping of option names to values")
    return values


def read_steps(path: str | Path, commands: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]] | None:
    """The steps of a pipeline file (a top-level ``steps:`` list of ``{command: {options}}``), in
    order; None for a plain config of one command."""
    values = read_yaml(path)
    if "steps" not in values:
        return None
    extra = sorted(set(values) - {"steps", "run_path", "metadata"})
    if extra:
        raise BergsonError(
            f"{path}: a pipeline holds steps, and optionally run_path (where the resolved steps are written) "
            f"and metadata (not read); unknown key(s) {extra}"
        )
    steps = values["steps"]
    if not isinstance(steps, list) or not steps:
        raise BergsonError(f"{path}: steps must be a non-empty list of `- command: {{options}}` entries")
    out = []
    for i, step in enumerate(steps, 1):
        if not isinstance(step, dict) or len(step) != 1:
            raise BergsonError(
                f"{path}: step {i} must be a one-key mapping such as `- magic: {{...}}`, got {step!r}"
            )
        ((name, options),) = step.items()
        command = str(name).lower()
        if command not in commands:
            raise BergsonError(
                f"{path}: step {i}: bergson has no command {name!r}; commands are {', '.join(commands)}"
            )
        options = dict(options or {})
        if "matrix" in options:
            raise BergsonError(f"{path}: step {i}: matrix steps are not supported; write one step per cell")
        out.append((command, options))
    return out


def pipeline_run_path(path: str | Path) -> str | None:
    """The top-level ``run_path`` of a pipeline file (where its resolved steps are written)."""
    value = read_yaml(path).get("run_path")
    return str(value) if value else None


def save_pipeline(path: str | Path, steps: list[tuple[str, Any]]) -> None:
    """Write the resolved configs of a pipeline's steps, in bergson's spelling, as a pipeline file
    (``bergson PATH`` runs it again)."""
    import yaml

    doc = {"steps": [{name: to_dict(cfg)} for name, cfg in steps]}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(doc, sort_keys=False))


def load_yaml(cls: type[_T], path: str | Path, notes: list[str] | None = None) -> _T:
    """Load a config dataclass from a YAML file (a pipeline file of one step included)."""
    from ..core.commands import COMMANDS

    steps = read_steps(path, COMMANDS)
    if steps is None:
        return from_dict(cls, read_yaml(path), where=str(path), notes=notes)
    if len(steps) != 1:
        raise BergsonError(f"{path} is a pipeline of {len(steps)} steps; run it as `bergson {path}`")
    return from_dict(cls, steps[0][1], where=f"{path} ({steps[0][0]})", notes=notes)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain data (for YAML and manifests)."""
    return asdict(cfg)


def save_yaml(cfg: Any, path: str | Path) -> None:
    """Write the resolved config next to a run's output."""
    import yaml

    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def options_of(cls: type[_T], cfg: Any, **changes: Any) -> _T:
    """A ``cls`` config with the options of ``cfg`` that ``cls`` also has (and ``changes``):
    how one command's config becomes another's (e.g. TrackStar's passes run as builds)."""
    assert is_dataclass(cls)
    known = {f.name for f in fields(cls)}
    return cls(**{**{f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name in known}, **changes})
