"""Which options of a command's config the library actually reads while the command runs.

:func:`recording` patches ``__getattribute__`` of the config dataclasses so that every read of
a field by library code is recorded as ``(class name, field)``. Reads made to serialize or copy a
config (``dataclasses.asdict``/``replace``, YAML, tyro's parsing) are not reads: they would
count every field."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path

NOT_READS = ("dataclasses.py", "/tyro/", "/yaml/", "copy.py")
"""Source files whose reads of a field serialize or copy a config rather than use it."""

_HERE = str(Path(__file__).resolve())


def _counts(frame) -> bool:
    path = frame.f_code.co_filename
    if path == _HERE or any(s in path for s in NOT_READS):
        return False
    # to_dict / save_yaml / check_saved_config serialize the whole config
    return frame.f_code.co_name not in ("to_dict", "save_yaml", "from_dict")


@contextlib.contextmanager
def recording(classes: list[type]) -> Iterator[set[tuple[str, str]]]:
    """Record the field reads of instances of ``classes`` (and their subclasses) while open."""
    reads: set[tuple[str, str]] = set()
    saved = {}
    for cls in classes:
        names = {f.name for f in dataclasses.fields(cls)}

        def getattribute(self, name, _names=names):
            value = object.__getattribute__(self, name)
            if name in _names and _counts(sys._getframe(1)):
                reads.add((type(self).__name__, name))
            return value

        saved[cls] = cls.__dict__.get("__getattribute__")
        cls.__getattribute__ = getattribute  # type: ignore[method-assign]
    try:
        yield reads
    finally:
        for cls, old in saved.items():
            if old is None:
                del cls.__getattribute__
            else:
                cls.__getattribute__ = old  # type: ignore[method-assign]
