"""The store's manifest: what produced the vectors and where each module's columns lie."""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BergsonError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


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

    @property
    def total_dim(self) -> int:
        return sum(m.dim for m in self.modules)

    def module(self, name: str) -> ModuleLayout:
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(f"no module {name!r} in this store; modules are {[m.name for m in self.modules]}")

    def identity(self) -> dict[str, Any]:
        """The fields that must agree for two runs to write the same vectors."""
        d = asdict(self)
        for k in ("status", "shards", "producer"):
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
VECTOR_FIELDS = ("model.name", "projection", "normalizer", "modules")
"""Fields that must agree for two sets of vectors to be compared (a preconditioner a store
carries is reconciled by the scorer, which applies what is still missing)."""


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None  # type: ignore[assignment]
    return d


def _module_map(modules: list[dict[str, Any]]) -> dict[str, Any]:
    return {m["name"]: {"shape": m["shape"], "dim": m["dim"], "bias": m["bias"]} for m in modules}


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


def check_compatible(index: Manifest, query: Manifest, index_name: str, query_name: str) -> None:
    """Fail, naming the field, when two stores' vectors do not live in the same space."""
    check_layouts(asdict(index), asdict(query), index_name, query_name)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name of this process's own, fsync, then rename over ``path`` (so
    that several processes may write the same file at once: the last rename wins, whole)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_manifest(root: Path, manifest: Manifest) -> None:
    atomic_write_bytes(root / MANIFEST, manifest.to_json().encode())


def read_manifest(root: str | Path) -> Manifest:
    """Read and validate a store's manifest."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise BergsonError(f"{root}: not a bergson store (no {MANIFEST})")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BergsonError(f"{path} is corrupt (not valid JSON: {e}); rebuild the store") from e
    if not isinstance(raw, dict) or "format_version" not in raw:
        raise BergsonError(f"{path} is corrupt (no format_version); rebuild the store")
    if raw["format_version"] > FORMAT_VERSION:
        raise BergsonError(
            f"{path} has format version {raw['format_version']}, newer than this bergson "
            f"understands ({FORMAT_VERSION}); upgrade bergson"
        )
    try:
        return Manifest.from_dict(raw)
    except TypeError as e:
        raise BergsonError(f"{path} is corrupt ({e}); rebuild the store") from e


def describe_difference(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable list of the fields that differ between two nested dicts."""
    diffs: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += describe_difference(a, b, prefix=f"{name}.")
        elif a != b:
            if isinstance(a, list) and isinstance(b, list) and len(str(a)) > 120:
                diffs.append(f"{name} (lists differ)")
            else:
                diffs.append(f"{name}: {a!r} != {b!r}")
    return diffs
