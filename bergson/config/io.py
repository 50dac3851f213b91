"""Configs as plain data: from YAML and dicts (unknown keys refused, old names accepted), to YAML."""

from __future__ import annotations

from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

from ..errors import BergsonError

ALIASES = {"unit_norm": "unit_normalize"}
"""Other names of an option (old or the original package's), accepted in YAML and dicts."""


_T = TypeVar("_T")


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Convert a YAML value to the annotated field type (nested dataclasses included)."""
    if isinstance(tp, type) and is_dataclass(tp):
        if not isinstance(value, dict):
            raise BergsonError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    origin = get_origin(tp)
    if origin is list and isinstance(value, list):
        (inner,) = get_args(tp) or (Any,)
        return [_convert(inner, v, where) for v in value]
    return value


def from_dict(cls: type[_T], values: dict[str, Any], where: str = "config") -> _T:
    """Build a config dataclass from a (possibly nested) dict, rejecting unknown keys."""
    assert is_dataclass(cls)
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    values = {ALIASES.get(k, k) if ALIASES.get(k) in known else k: v for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise BergsonError(
            f"{where}: unknown option(s) {', '.join(unknown)}; valid options are {', '.join(sorted(known))}"
        )
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def load_yaml(cls: type[_T], path: str | Path) -> _T:
    """Load a config dataclass from a YAML file."""
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
    return from_dict(cls, values, where=str(p))


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
