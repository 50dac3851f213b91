"""The store's manifest: what produced the vectors and where each module's columns lie."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from ..core.files import atomic_write_bytes
from ..core.layout import ModuleLayout, check_layouts
from ..errors import BergsonError

FORMAT_VERSION = 2
"""2: shards carry checksums, rows carry norms, and the manifest records non-finite rows and norm
outliers (``nonfinite``, ``norms``); stores of version 1 are read as they are, without them."""
MANIFEST = "manifest.json"
_RESULTS = ("status", "shards", "producer", "nonfinite", "norms", "format_version")
"""Fields that describe what a run produced, not how: two runs with the same other fields write
the same vectors."""


@dataclass
class Manifest:
    """Everything needed to reproduce and validate a store's vectors."""

    kind: str
    """'gradients' (a row per document), 'aggregate' (one row for a dataset) or 'scores'."""
    status: str
    """'in_progress' while being written, 'complete' when every shard is in place."""
    model: dict[str, Any]
    modules: list[ModuleLayout]
    projection: dict[str, Any]
    normalizer: dict[str, Any] | None
    preconditioner: dict[str, Any] | None
    loss: dict[str, Any]
    dtype: str
    num_rows: int
    data: dict[str, Any]
    plan: dict[str, Any] = field(default_factory=dict)
    """How rows are grouped into shards and batches (so that a resumed run matches)."""
    aggregation: str = "none"
    unit_normalize: bool = False
    score: dict[str, Any] | None = None
    """For score stores: how scores were made, and their orientation."""
    per_token: bool = False
    """Each shard also holds one row per token (``tokens.npy``: the rows' tokens in order, as many
    as each row's ``num_tokens``); a row's token rows sum to the row."""
    shards: list[dict[str, Any]] = field(default_factory=list)
    format_version: int = FORMAT_VERSION
    producer: dict[str, Any] = field(default_factory=dict)
    nonfinite: dict[str, Any] | None = None
    """Rows whose vectors were not finite (NaN or inf) when written, stored as zeros: ``count``,
    ``row_ids`` (the first ones) and ``action``. None for a store written before this record."""
    norms: dict[str, Any] | None = None
    """Per-row norms (the ``norm`` column of the rows' metadata): their ``median`` and the rows
    whose norm is above ``outlier_factor`` times it (``outliers``: ``count`` and ``row_ids``)."""

    @property
    def total_dim(self) -> int:
        return sum(m.dim for m in self.modules)

    def module(self, name: str) -> ModuleLayout:
        for m in self.modules:
            if m.name == name:
                return m
        raise BergsonError(
            f"no module {name!r} in this store; its modules are {[m.name for m in self.modules]}"
        )

    def identity(self) -> dict[str, Any]:
        """The fields that must agree for two runs to write the same vectors."""
        d = asdict(self)
        for k in _RESULTS:
            d.pop(k)
        return d

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        d = dict(d)
        d["modules"] = [ModuleLayout(**m) for m in d["modules"]]
        return cls(**d)


SCORE_ORIENTATION = "positive: training on the row lowers the query's loss (gradient inner product)"


def check_compatible(index: Manifest, query: Manifest, index_name: str, query_name: str) -> None:
    """Fail, naming the field, when two stores' vectors do not live in the same space."""
    check_layouts(asdict(index), asdict(query), index_name, query_name)


def write_manifest(root: Path, manifest: Manifest) -> None:
    atomic_write_bytes(root / MANIFEST, manifest.to_json().encode())


def read_manifest(root: str | Path) -> Manifest:
    """Read and validate a store's manifest: every field there, of the right type (a damaged or
    hand-edited manifest is an error naming the field, never a traceback)."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise BergsonError(f"{root}: not a bergson store (no {MANIFEST})")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BergsonError(f"{path} is corrupt (not valid JSON: {e}); rebuild the store") from e
    if not isinstance(raw, dict) or "format_version" not in raw:
        raise BergsonError(f"{path} is corrupt (no format_version); rebuild the store")
    version = raw["format_version"]
    if not _is_int(version) or version < 1:
        raise BergsonError(
            f"{path} is damaged: format_version is {version!r}, not a positive integer; "
            "rebuild the store (or restore manifest.json)"
        )
    if version > FORMAT_VERSION:
        raise BergsonError(
            f"{path} has format version {version}, newer than this bergson "
            f"understands ({FORMAT_VERSION}); upgrade bergson"
        )
    problem = manifest_problem(raw)
    if problem:
        raise BergsonError(f"{path} is damaged: {problem}; rebuild the store (or restore manifest.json)")
    try:
        return Manifest.from_dict(raw)
    except TypeError as e:
        raise BergsonError(f"{path} is corrupt ({e}); rebuild the store") from e


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_TYPES: dict[str, tuple[type, ...]] = {
    "kind": (str,),
    "status": (str,),
    "model": (dict,),
    "modules": (list,),
    "projection": (dict,),
    "normalizer": (dict, type(None)),
    "preconditioner": (dict, type(None)),
    "loss": (dict,),
    "dtype": (str,),
    "num_rows": (int,),
    "data": (dict,),
    "plan": (dict,),
    "shards": (list,),
    "nonfinite": (dict, type(None)),
    "norms": (dict, type(None)),
}
_REQUIRED = ("kind", "status", "model", "modules", "projection", "loss", "dtype", "num_rows", "data")


def manifest_problem(raw: dict[str, Any]) -> str:
    """What is wrong with a manifest's fields ('' when nothing): a required field missing, a
    field of the wrong type, a module block or shard entry that cannot be read."""
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        return f"no {', '.join(repr(k) for k in missing)} field"
    for key, types in _TYPES.items():
        if key in raw and (not isinstance(raw[key], types) or isinstance(raw[key], bool)):
            return f"{key!r} is {raw[key]!r}, not a {' or '.join(t.__name__ for t in types)}"
    unknown = sorted(set(raw) - {f.name for f in fields(Manifest)})
    if unknown:
        return f"unknown fields {unknown} (written by a newer bergson? then upgrade bergson)"
    try:
        np.dtype(raw["dtype"])
    except TypeError:
        return f"'dtype' is {raw['dtype']!r}, not a numpy dtype"
    names = {f.name for f in fields(ModuleLayout)}
    for i, m in enumerate(raw["modules"]):
        if not isinstance(m, dict) or not {"name", "type", "shape", "bias", "offset", "dim"} <= set(m):
            return f"module {i} is {str(m)[:80]}, not a block with name, type, shape, bias, offset and dim"
        if set(m) - names:
            return f"module {m['name']!r} has unknown fields {sorted(set(m) - names)}"
        if not (_is_int(m["offset"]) and _is_int(m["dim"]) and m["offset"] >= 0 and m["dim"] >= 0):
            return f"module {m['name']!r} has offset {m['offset']!r} and dim {m['dim']!r}, not integers >= 0"
    for i, shard in enumerate(raw.get("shards", [])):
        if (
            not isinstance(shard, dict)
            or not isinstance(shard.get("file"), str)
            or not _is_int(shard.get("rows"))
        ):
            return f"shard entry {i} is {str(shard)[:80]}, not a file name with a row count"
        name = shard["file"]
        if name.startswith(("/", "\\")) or ".." in Path(name).parts or shard["rows"] < 0:
            return (
                f"shard entry {i} names {name!r} with {shard['rows']} rows (outside the store, or negative)"
            )
    return ""
