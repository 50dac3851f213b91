"""Damaged stores for the tests: each kind of damage a store can suffer on disk (a manifest edited
by hand, a shard cut short or overwritten, a metadata file corrupted), applied to a complete store.

:data:`DAMAGES` maps a kind to ``(damage(root) -> the damaged file, relative to root)``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _rewrite_manifest(root: Path, change: Callable[[dict], None]) -> str:
    m = _manifest(root)
    change(m)
    (root / "manifest.json").write_text(json.dumps(m))
    return "manifest.json"


def _first_shard(root: Path) -> str:
    return _manifest(root)["shards"][0]["file"]


def no_modules(root: Path) -> str:
    return _rewrite_manifest(root, lambda m: m.pop("modules"))


def version_as_string(root: Path) -> str:
    return _rewrite_manifest(root, lambda m: m.update(format_version=str(m["format_version"])))


def truncated_shard(root: Path) -> str:
    name = f"{_first_shard(root)}.npy"
    path = root / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 16])
    return name


def overwritten_header(root: Path) -> str:
    """The header rewritten (same length) to say the shard holds Python objects: numpy would
    refuse it as pickled data."""
    name = f"{_first_shard(root)}.npy"
    path = root / name
    data = bytearray(path.read_bytes())
    length = int.from_bytes(data[8:10], "little")
    rows, dim = np.load(path, mmap_mode="r").shape
    header = f"{{'descr': '|O', 'fortran_order': False, 'shape': ({rows}, {dim}), }}"
    data[10 : 10 + length] = (header.ljust(length - 1) + "\n").encode()
    path.write_bytes(bytes(data))
    return name


def wrong_width(root: Path) -> str:
    name = f"{_first_shard(root)}.npy"
    path = root / name
    a = np.load(path)
    np.save(path, np.concatenate([a, a[:, :1]], axis=1))
    return name


def fewer_rows(root: Path) -> str:
    name = f"{_first_shard(root)}.npy"
    path = root / name
    np.save(path, np.load(path)[:-1])
    return name


def corrupt_rows_parquet(root: Path) -> str:
    name = f"{_first_shard(root)}.rows.parquet"
    path = root / name
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid - 40 : mid + 40] = b"\xff" * 80
    data[-8:-4] = b"\x00\x00\xff\xff"  # the footer's length: points outside the file
    path.write_bytes(bytes(data))
    return name


DAMAGES: dict[str, Callable[[Path], str]] = {
    "manifest without modules": no_modules,
    "format_version as a string": version_as_string,
    "shard truncated": truncated_shard,
    "shard header overwritten": overwritten_header,
    "shard of the wrong width": wrong_width,
    "shard with fewer rows than its metadata": fewer_rows,
    "rows.parquet corrupted": corrupt_rows_parquet,
}
