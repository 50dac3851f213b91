"""Atomic file writes and readable differences between settings: the bottom floor of bergson
(it imports nothing of ours)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any


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


def disk_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (or of the file itself; 0 when it does not exist)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def megabytes(n: int) -> str:
    """``n`` bytes for a reader: '12.34 MB', or '532 B' below 10 kB."""
    return f"{n / 1e6:.2f} MB" if n >= 10_000 else f"{n} B"
