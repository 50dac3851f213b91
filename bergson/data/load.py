"""Open a dataset from a hub id, a local file or a ``save_to_disk`` directory.

A local path never reaches out to the hub.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..config import DataConfig
from ..errors import BergsonError

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_COMPRESSION = {".gz", ".bz2", ".xz", ".zst", ".zstd"}


def _builder_for(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION:
        suffixes = suffixes[:-1]
    return _BUILDERS.get(suffixes[-1]) if suffixes else None


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or _builder_for(Path(name)) is not None


def _slice_split(ds: Any, split: str, option: str) -> Any:
    """Apply 'name[a:b]' slice syntax to an in-memory Dataset or DatasetDict."""
    from datasets import DatasetDict, ReadInstruction

    name = split.split("[", 1)[0]
    if isinstance(ds, DatasetDict):
        if name not in ds:
            raise BergsonError(
                f"{option} {split}: no split {name!r}; available: {', '.join(str(k) for k in ds)}"
            )
        ds = ds[name]
        lengths = {name: len(ds)}
    else:
        lengths = {name: len(ds)}
    if "[" not in split:
        return ds
    try:
        (instr,) = ReadInstruction.from_spec(split).to_absolute(lengths)
    except (ValueError, AssertionError) as e:
        raise BergsonError(f"{option} {split}: cannot parse the slice ({e})") from e
    return ds.select(range(instr.from_, instr.to))


def load_data(cfg: DataConfig, option: str = "--dataset") -> Any:
    """Load ``cfg.dataset`` (one split, sliced) as a ``datasets.Dataset``."""
    import datasets

    name = cfg.dataset
    if not name:
        raise BergsonError(f"{option} is required: a hub id, a local file or a save_to_disk directory")
    path = Path(os.path.expanduser(name))
    saved = path.is_dir() and any(
        (path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json")
    )
    if cfg.subset is not None and (saved or path.is_file()):
        raise BergsonError(
            f"{option.replace('dataset', 'subset')} {cfg.subset}: it names a configuration of a hub dataset "
            f"that has several, and {name} is a single {'saved dataset' if saved else 'file'}; drop the option"
        )
    try:
        if path.is_dir():
            if saved:
                return _slice_split(datasets.load_from_disk(str(path)), cfg.split, "--split")
            return datasets.load_dataset(str(path), cfg.subset, split=cfg.split)
        if path.is_file():
            builder = _builder_for(path)
            if builder is None:
                raise BergsonError(
                    f"{option} {name}: unknown file type; use .json, .jsonl, .csv or .parquet (optionally .gz)"
                )
            if cfg.split.split("[", 1)[0] != "train":
                raise BergsonError(
                    f"--split {cfg.split}: a single local file has only the 'train' split (e.g. 'train[:100]')"
                )
            return datasets.load_dataset(builder, data_files=str(path), split=cfg.split)
        if _looks_like_path(name):
            raise BergsonError(f"{option} {name}: no such file or directory")
        return datasets.load_dataset(name, cfg.subset, split=cfg.split)
    except BergsonError:
        raise
    except (FileNotFoundError, ValueError) as e:
        raise BergsonError(f"{option} {name} (split {cfg.split!r}): {e}") from e
