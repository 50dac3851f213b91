"""Stores written by the original ``bergson`` package (up to 2.5.1), read in place.

Such a store is a directory with ``info.json`` (``num_grads``, ``grad_sizes`` — module name to
column count, in column order —, ``base_dtype`` or, in older ones, a structured ``dtype``),
``gradients.bin`` (a raw C-order [num_grads, total_dim] array, no header) and ``data.hf`` (the
dataset's rows, saved with ``datasets``' ``save_to_disk``, with a ``loss`` column), beside
``processor_config.yaml`` (projection settings) and ``config.yaml`` (the run's options). A store
built in several parts has one such directory per part, as subdirectories.

:func:`open_legacy` maps ``gradients.bin`` read-only and describes it with a :class:`Manifest`, so
that every reader of our stores (search, score, reduce, report, the dataset view) reads it as is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..core.layout import ModuleLayout
from ..errors import BergsonError
from .manifest import Manifest

INFO = "info.json"
GRADIENTS = "gradients.bin"
DATA = "data.hf"
PROCESSOR = "processor_config.yaml"
IN_PLACE_DTYPES = ("float16", "float32", "float64")
ORIGINAL = "bergson<=2.5.1"
ROW_FIELDS = [("row_id", np.int64), ("num_tokens", np.int64), ("loss", np.float32)]


def is_legacy_store(root: str | Path) -> bool:
    """Whether ``root`` holds a store of the original package (itself, or parts of it below)."""
    return bool(legacy_parts(Path(root)))


def legacy_parts(root: Path) -> list[Path]:
    """The directories holding ``info.json`` and ``gradients.bin``: ``root``, or its subdirectories
    (a store built in parts), in name order."""
    if (root / INFO).is_file() and (root / GRADIENTS).is_file():
        return [root]
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / INFO).is_file() and (p / GRADIENTS).is_file())


def read_info(part: Path) -> dict[str, Any]:
    """``info.json`` of one part, checked: its rows, module widths and scalar dtype."""
    path = part / INFO
    try:
        info = json.loads(path.read_text())
        sizes = {str(k): int(v) for k, v in info["grad_sizes"].items()}
        num_grads = int(info["num_grads"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise BergsonError(f"{path}: not an info.json of the original bergson ({e!r})") from e
    info["grad_sizes"], info["num_grads"] = sizes, num_grads
    info["scalar_dtype"] = _scalar_dtype(info, path)
    expected = num_grads * sum(sizes.values()) * np.dtype(_numpy_dtype(info["scalar_dtype"])).itemsize
    actual = (part / GRADIENTS).stat().st_size
    if actual != expected:
        raise BergsonError(
            f"{part / GRADIENTS}: {actual} bytes, but {INFO} describes {num_grads} rows of "
            f"{sum(sizes.values())} {info['scalar_dtype']} values ({expected} bytes); the store is truncated "
            "or was interrupted: rebuild it"
        )
    return info


def _scalar_dtype(info: dict[str, Any], path: Path) -> str:
    """The one scalar type of every value: ``base_dtype`` (2.x), or the fields of the structured
    ``dtype`` older versions wrote (one field per module, packed in ``grad_sizes`` order)."""
    if "base_dtype" in info:
        return str(info["base_dtype"])
    spec = info.get("dtype")
    if not isinstance(spec, dict) or not spec.get("formats"):
        raise BergsonError(f"{path}: neither base_dtype nor a structured dtype; not a store of the original")
    fields: Any = {k: spec[k] for k in ("names", "formats", "offsets", "itemsize") if k in spec}
    try:
        structured = np.dtype(fields)
    except (TypeError, ValueError) as e:
        raise BergsonError(f"{path}: unreadable structured dtype ({e})") from e
    layout = structured.fields or {}
    bases = {layout[n][0].base for n in structured.names or ()}
    packed = (
        len(bases) == 1
        and structured.itemsize == sum(info["grad_sizes"].values()) * next(iter(bases)).itemsize
    )
    if not packed or list(structured.names or ()) != list(info["grad_sizes"]):
        raise BergsonError(
            f"{path}: its fields are not one scalar type packed in grad_sizes order; convert it with the "
            "original package (load_gradients, then save the array) first"
        )
    return next(iter(bases)).name


def _numpy_dtype(name: str) -> np.dtype:
    # bfloat16 has no numpy type without ml_dtypes: its bytes are read as uint16 and widened
    return np.dtype(np.uint16) if name == "bfloat16" else np.dtype(name)


def map_gradients(part: Path, info: dict[str, Any]) -> np.ndarray:
    """``gradients.bin`` of one part, memory-mapped read-only as stored (bfloat16 as raw uint16)."""
    total = sum(info["grad_sizes"].values())
    if info["num_grads"] == 0:
        return np.zeros((0, total), _numpy_dtype(info["scalar_dtype"]))
    return np.memmap(
        part / GRADIENTS, dtype=_numpy_dtype(info["scalar_dtype"]), mode="r", shape=(info["num_grads"], total)
    )


def bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 values (raw uint16 bits) widened exactly to float32."""
    return (np.asarray(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)


def _yaml(path: Path) -> Any:
    if not path.is_file():
        return None
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return None


def _find(tree: Any, key: str) -> Any:
    """The first value of ``key`` anywhere in a nested YAML document (the original's run config
    nests a command's options under ``steps``/``index_cfg``)."""
    if isinstance(tree, dict):
        if key in tree and not isinstance(tree[key], dict | list):
            return tree[key]
        tree = list(tree.values())
    if isinstance(tree, list):
        for item in tree:
            found = _find(item, key)
            if found is not None:
                return found
    return None


def load_rows_data(part: Path) -> Any:
    """``data.hf`` of one part (memory-mapped by ``datasets``), or None when it is absent."""
    if not (part / DATA).is_dir():
        return None
    from datasets import Dataset

    return Dataset.load_from_disk(str(part / DATA))


def row_meta(data: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(num_tokens, loss) of a part's rows from its ``data.hf`` (zeros where it lacks them)."""
    tokens, loss = np.zeros(n, np.int64), np.zeros(n, np.float32)
    if data is None or len(data) != n:
        return tokens, loss
    cols = data.column_names
    if "length" in cols:
        tokens = np.asarray(data["length"], np.int64)
    elif "input_ids" in cols:
        tokens = np.fromiter((len(x) for x in data["input_ids"]), np.int64, count=n)
    if "loss" in cols:
        loss = np.asarray(data["loss"], np.float32)
    return tokens, loss


def open_legacy(root: Path) -> tuple[Manifest, list[np.ndarray], np.ndarray]:
    """(manifest, memory-mapped parts, per-row metadata [row_id, num_tokens, loss]) of a store of
    the original package. Row ids count the rows of all parts in order."""
    parts = legacy_parts(root)
    if not parts:
        raise BergsonError(f"{root}: no {INFO} and {GRADIENTS}; not a store of the original bergson")
    infos = [read_info(p) for p in parts]
    first = infos[0]
    for part, info in zip(parts[1:], infos[1:]):
        if info["grad_sizes"] != first["grad_sizes"] or info["scalar_dtype"] != first["scalar_dtype"]:
            raise BergsonError(f"{part}: its modules or dtype differ from those of {parts[0]}")
    if any(info.get("attribute_tokens") for info in infos):
        raise BergsonError(
            f"{root} holds per-token gradients of the original (attribute_tokens) and no per-document "
            "rows; rebuild it with `bergson build --per_token`, which keeps both"
        )
    if first["scalar_dtype"] not in IN_PLACE_DTYPES:
        raise BergsonError(
            f"{root} holds {first['scalar_dtype']} gradients, which numpy cannot read in place; convert the "
            f"store once: `bergson convert {root} NEW_DIR` (writes float32)"
        )
    arrays = [map_gradients(p, i) for p, i in zip(parts, infos)]
    metas = [row_meta(load_rows_data(p), i["num_grads"]) for p, i in zip(parts, infos)]
    rows = np.zeros(sum(i["num_grads"] for i in infos), ROW_FIELDS)
    rows["row_id"] = np.arange(len(rows))
    rows["num_tokens"] = np.concatenate([m[0] for m in metas]) if metas else []
    rows["loss"] = np.concatenate([m[1] for m in metas]) if metas else []
    manifest = legacy_manifest(root, parts[0], first, len(rows))
    return manifest, arrays, rows


def legacy_manifest(root: Path, part: Path, info: dict[str, Any], num_rows: int) -> Manifest:
    """A manifest describing the original's store as well as its files allow. Module shapes are
    not recorded there: they are left empty ([]) until ``bergson convert --model`` fills them."""
    proc = _yaml(part / PROCESSOR) or {}
    run = _yaml(part / "config.yaml") or _yaml(root / "config.yaml") or {}
    p = int(proc.get("projection_dim") or 0)
    bias = bool(proc.get("include_bias", False))
    layouts, offset = [], 0
    for name, dim in info["grad_sizes"].items():
        layouts.append(ModuleLayout(name, "unknown", [], bias, offset, dim))
        offset += dim
    projection: dict[str, Any] = {"kind": "none", "dim": 0, "seed": 0, "include_bias": bias}
    if p:
        # the original's matrices: our queries cannot reproduce them, so the kind differs from ours
        projection = {
            "kind": f"original_{proc.get('projection_type', 'normal')}_{proc.get('projection_scale', 'row_norm')}"
            f"_v{proc.get('projection_version', 1)}",
            "dim": p,
            "seed": proc.get("projection_seed"),
            "include_bias": bias,
        }
    data_cols: list[str] = []
    data = load_rows_data(part)
    if data is not None:
        data_cols = list(data.column_names)
    aggregate = data_cols == ["query_index"]
    dataset, split = _find(run, "dataset"), _find(run, "split") or "train"
    if (
        data is not None
        and len(legacy_parts(root)) == 1
        and (_find(run, "prompt_column") or "text") in data_cols
    ):
        dataset, split = str(part / DATA), "train"  # the rows saved with the store, texts included
    return Manifest(
        kind="aggregate" if aggregate else "gradients",
        status="complete",
        model={"name": _find(run, "model"), "revision": _find(run, "revision")},
        modules=layouts,
        projection=projection,
        normalizer={"kind": "original"} if _has_normalizers(part) else None,
        preconditioner=_carried_hessian(run),
        loss={"kind": "causal_lm", "reduction": _find(run, "loss_reduction") or "sum"},
        dtype=info["scalar_dtype"],
        num_rows=num_rows,
        data={
            "dataset": dataset,
            "split": split,
            "columns": data_cols,
            "original_dataset": _find(run, "dataset"),
        },
        aggregation=(_find(run, "aggregation") or "sum") if aggregate else "none",
        unit_normalize=bool(_find(run, "unit_normalize")),
        shards=[{"file": str(p.relative_to(root)) if p != root else "."} for p in legacy_parts(root)],
        producer={"original": ORIGINAL, "path": str(root)},
    )


def _has_normalizers(part: Path) -> bool:
    """Whether the original saved normalizers (a non-empty ``normalizers.pth``)."""
    path = part / "normalizers.pth"
    if not path.is_file():
        return False
    import torch

    try:
        return bool(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:  # an unreadable file is reported, not guessed at
        raise BergsonError(f"{path}: unreadable ({e}); remove it if the store has no normalizers") from e


def _carried_hessian(run: Any) -> dict[str, Any] | None:
    """The preconditioner the original applied while building (its ``hessian_path``): H^-1/2 with
    unit normalization, H^-1 without, as its builder did."""
    path = _find(run, "hessian_path")
    if not path:
        return None
    return {"kind": "original", "path": str(path), "power": -0.5 if _find(run, "unit_normalize") else -1.0}
