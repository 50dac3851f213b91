"""Seconds per stage of a resumable run, kept in ``RUN/timings.json``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .core.files import atomic_write_bytes

TIMINGS_FILE = "timings.json"


class Timings(dict):
    """A dict of stage -> seconds (and any extra figures) loaded from ``root/timings.json``
    and rewritten atomically after every record, so a resumed run keeps earlier stages'."""

    def __init__(self, root: str | Path):
        self.path = Path(root) / TIMINGS_FILE
        super().__init__(json.loads(self.path.read_text()) if self.path.is_file() else {})

    def record(self, key: str, start: float, **extra: Any) -> None:
        """Store the seconds since ``start`` (a ``time.perf_counter()`` value) under ``key``."""
        self[key] = round(time.perf_counter() - start, 3)
        self.update(extra)
        atomic_write_bytes(self.path, json.dumps(self, indent=2).encode())
