"""One run directory: what every resumable command (ekfac, magic, trackstar, preconditioner)
does with its ``run_path`` before and after its passes.

:meth:`RunDir.prepare` (collective) lets rank 0 remove the command's outputs under
``--overwrite``, refuse a directory that holds a run made with other options, and save the
resolved config; a command whose later stages are read by every rank then checks that every
rank sees rank 0's directory. :class:`Timings` keeps the seconds each stage took.

The directory is locked for the whole command before any of this (:mod:`bergson.core.lock`,
taken by the command's entry point, :func:`bergson.distributed.launch.entry`, once per launch):
:meth:`RunDir.prepare` takes it too (re-entrant: a no-op under an entry point), so a second
writer never reaches the ``--overwrite`` removal.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .. import distributed
from ..config import load_yaml, save_yaml, to_dict
from ..core.files import atomic_write_bytes, describe_difference
from ..errors import BergsonError
from ..store.writer import remove_outputs

TIMINGS_FILE = "timings.json"

WORKER_OPTIONS = ("nproc_per_node", "dist_timeout", "fsdp")
"""Options that change how a run is spread over workers, never its results."""


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


def check_saved_config(cfg: Any, path: Path, what: str, ignore: Sequence[str] = ()) -> None:
    """Fail if ``path`` holds a config with other options than ``cfg`` (``overwrite``, the worker
    options and the fields in ``ignore``, which do not change results, aside)."""
    if not path.is_file():
        return
    old = to_dict(replace(load_yaml(type(cfg), path), overwrite=False))
    new = to_dict(replace(cfg, overwrite=False))
    for key in (*ignore, *WORKER_OPTIONS):
        old.pop(key, None)
        new.pop(key, None)
    diff = describe_difference(old, new)
    if diff:
        raise BergsonError(
            f"{path.parent} already holds {what} made with other options ({'; '.join(diff[:3])}); "
            "pass --overwrite to replace it or choose another run path"
        )


class RunDir:
    """The run directory of one command, named by ``cfg.run_path``.

    ``outputs`` are the files and directories ``--overwrite`` removes (the config file and
    ``timings.json`` always); ``ignore`` lists options that may differ from the saved config's
    without changing results; ``shared`` says why every rank must see rank 0's directory (None
    when the command copes with machines that do not share it)."""

    def __init__(
        self,
        cfg: Any,
        *,
        command: str,
        what: str,
        config_file: str = "config.yaml",
        outputs: Sequence[str] = (),
        ignore: Sequence[str] = (),
        shared: str | None = None,
    ):
        if not getattr(cfg, "run_path", None):
            raise BergsonError(f"--run_path is required: the output directory of the {command} run")
        self.cfg = cfg
        self.root = Path(cfg.run_path)
        self.command = command
        self.what = what
        self.config_file = config_file
        self.outputs = (*outputs, config_file, TIMINGS_FILE)
        self.ignore = tuple(ignore)
        self.shared = shared
        self.lead = distributed.rank() == 0
        self._timings: Timings | None = None

    def check_config(self) -> None:
        """Fail if the directory holds a run made with other options."""
        check_saved_config(self.cfg, self.root / self.config_file, self.what, self.ignore)

    def _locked_prepare(self) -> None:
        # re-entrant: the entry point already holds it (and a launch's spawned workers are not rank 0
        # of a launch that holds none); a RunDir used outside an entry point takes it for its prepare
        with distributed.hold_run_path(self.cfg, self.command):
            self._prepare()

    def _prepare(self) -> None:
        if self.cfg.overwrite and self.root.exists():
            remove_outputs(self.root, self.outputs)
        self.check_config()
        self.root.mkdir(parents=True, exist_ok=True)
        save_yaml(self.cfg, self.root / self.config_file)

    def prepare(self) -> RunDir:
        """Rank 0 prepares the directory while the others wait (collective); returns self."""
        distributed.on_rank_zero(self._locked_prepare, f"preparing the run directory {self.root}")
        if self.shared is not None:
            distributed.require_shared_directory(self.root, self.command, self.shared)
        return self

    @property
    def timings(self) -> Timings:
        """The seconds of the stages recorded so far (this run's and earlier runs')."""
        if self._timings is None:
            self._timings = Timings(self.root)
        return self._timings

    def record(self, stage: str, start: float, **extra: Any) -> None:
        """Record a stage's seconds since ``start`` (rank 0 alone writes)."""
        if self.lead:
            self.timings.record(stage, start, **extra)
