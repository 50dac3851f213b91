"""The store's manifest: what produced the vectors and where each module's columns lie."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..core.files import atomic_write_bytes
from ..core.layout import ModuleLayout, check_layouts
from ..errors import BergsonError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


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
        raise BergsonError(
            f"no module {name!r} in this store; its modules are {[m.name for m in self.modules]}"
        )

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


def check_compatible(index: Manifest, query: Manifest, index_name: str, query_name: str) -> None:
    """Fail, naming the field, when two stores' vectors do not live in the same space."""
    check_layouts(asdict(index), asdict(query), index_name, query_name)


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
