"""Starting several workers, and running a command's entry point on them.

Two ways to start N workers, with the same result::

    torchrun --nproc_per_node N -m bergson build ...   # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK,
                                                       # MASTER_ADDR and MASTER_PORT for each worker
    bergson build ... --nproc_per_node N               # bergson starts N local workers (:func:`launch`)

Which commands split their work, and how, is the ``workers`` column of the one command table
(:data:`bergson.core.commands.COMMANDS`); the others refuse a launch (:func:`check_command`).

Faults: a rank that raises prints its error naming its rank and exits non-zero (a rank that
stops because another failed exits :data:`PEER_EXIT`); the launcher (:func:`launch`, or
torchrun's agent) then stops the other ranks. Completed shards stay on disk, so rerunning the
same command resumes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..core.commands import COMMANDS, distributed_commands
from ..core.devices import launched
from ..errors import BergsonError
from .group import env_rank, env_world_size, init_from, world_size

logger = logging.getLogger(__name__)

SPAWNED = "BERGSON_SPAWNED"
"""Set by :func:`launch` in its workers: the launching process reports the result, not rank 0."""

PEER_EXIT = 3
"""Exit status of a rank that stops because another rank failed (the launcher names the other)."""


def reports() -> bool:
    """Whether this process prints a command's summary: rank 0, unless :func:`launch` started
    it (then the launching process prints it)."""
    return env_rank() == 0 and SPAWNED not in os.environ


def command_of(cfg: Any) -> str | None:
    """The command whose workers run ``cfg`` (a config of a command that splits its work), if any."""
    from ..config.commands import command_of as any_command_of

    name = any_command_of(cfg)
    return name if name and COMMANDS[name].workers else None


def requested(cfg: Any) -> int:
    """The config's ``nproc_per_node`` (1 when it has none), checked."""
    n = getattr(cfg, "nproc_per_node", 1)
    if n < 1:
        raise BergsonError(f"--nproc_per_node {n}: must be at least 1")
    return n


def _several(cfg: Any) -> bool:
    """Whether ``cfg`` asks for several workers, or this process is one of a launch of several."""
    return requested(cfg) > 1 or env_world_size() > 1


def check_command(command: str, cfg: Any) -> None:
    """Refuse to run a command that does not split its work on several ranks."""
    if command in distributed_commands() or not _several(cfg):
        return
    raise BergsonError(
        f"bergson {command} does not run on several processes yet (only "
        f"{', '.join(distributed_commands())} do); run it as one process, without --nproc_per_node or torchrun"
    )


def refuse(cfg: Any, what: str) -> None:
    """Fail when ``what`` (work that runs in one process) is asked for on several ranks."""
    if _several(cfg) or world_size() > 1:
        raise BergsonError(
            f"{what} runs in one process; drop --nproc_per_node (or start it without torchrun)"
        )


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    """Terminate the workers still running (SIGTERM, then SIGKILL after ``grace`` seconds)."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + grace
    for p in alive:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _wait(procs: list[subprocess.Popen]) -> None:
    """Wait for every worker; when one fails, stop the others and raise naming its rank."""
    n = len(procs)
    while True:
        codes = [p.poll() for p in procs]
        failed = [r for r, c in enumerate(codes) if c is not None and c != 0]
        if failed:
            first = next((r for r in failed if codes[r] != PEER_EXIT), failed[0])
            _stop(procs)
            code = codes[first]
            assert code is not None
            raise BergsonError(
                f"rank {first} of {n} failed ({_describe_exit(code)}; its messages are above) and the "
                "other ranks were stopped; completed shards are kept, so rerunning the same command "
                "(once the cause is fixed) resumes"
            )
        if all(c == 0 for c in codes):
            return
        time.sleep(0.1)


def launch(cfg: Any) -> None:
    """Run ``cfg``'s command on ``cfg.nproc_per_node`` local workers and wait for them.

    Each worker is ``python -m bergson COMMAND --config CFG.yaml`` (the resolved config) with
    the environment torchrun would give it (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
    MASTER_ADDR=127.0.0.1 and a free MASTER_PORT); its output goes to this process's. Each
    worker gets ``OMP_NUM_THREADS`` = cores / workers unless it is set (torchrun sets 1). When
    a worker fails the others are stopped and a :class:`BergsonError` names its rank.
    """
    n = requested(cfg)
    command = command_of(cfg)
    if command is None:
        raise BergsonError(
            f"--nproc_per_node: {type(cfg).__name__} runs have no command to start workers with"
        )
    from ..config import save_yaml

    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE=str(n),
        LOCAL_WORLD_SIZE=str(n),
        GROUP_RANK="0",
        **{SPAWNED: "1"},
    )
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    logger.info("starting %d workers for bergson %s", n, command)
    with tempfile.TemporaryDirectory(prefix="bergson-workers-") as tmp:
        path = Path(tmp) / "config.yaml"
        save_yaml(cfg, path)
        procs: list[subprocess.Popen] = []
        try:
            for r in range(n):
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "bergson", command, "--config", str(path)],
                        env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                    )
                )
            _wait(procs)
        finally:
            _stop(procs)


_F = TypeVar("_F", bound=Callable[..., Any])


def hold_run_path(cfg: Any, command: str | None = None) -> contextlib.AbstractContextManager[Any]:
    """The exclusive lock of ``cfg.run_path`` (:mod:`bergson.core.lock`), taken once per launch: by
    this process when it is alone or starts the workers, by rank 0 under torchrun, and not by the
    workers :func:`launch` started (the launching process holds it)."""
    run_path = getattr(cfg, "run_path", "")
    if not run_path or (launched() and (env_rank() != 0 or SPAWNED in os.environ)):
        return contextlib.nullcontext()
    from ..core.lock import run_lock

    return run_lock(run_path, command or command_of(cfg) or type(cfg).__name__)


def entry(
    result: Callable[[Any], Any], alone: Callable[[Any], str | None] | None = None
) -> Callable[[_F], _F]:
    """Decorate a command's entry point ``fn(cfg, ...)`` to run on several ranks.

    With ``cfg.nproc_per_node`` > 1 outside a launch, the workers are started (:func:`launch`)
    and ``result(cfg)`` (the output they wrote, read back) is returned. Under a launch, ``fn``
    runs in the process group (joined here when needed). ``alone(cfg)`` names the option that
    keeps a run in one process (None: it can be split); such runs on several ranks are refused.
    """

    def deco(fn: _F) -> _F:
        @functools.wraps(fn)
        def wrapper(cfg: Any, *args: Any, **kwargs: Any) -> Any:
            n = requested(cfg)
            reason = alone(cfg) if alone is not None else None
            if reason:
                refuse(cfg, reason)
            if n > 1 and not launched():
                if any(a is not None for a in (*args, *kwargs.values())):
                    raise BergsonError(
                        "--nproc_per_node: objects passed in Python (such as normalizers) cannot reach "
                        "the workers; use --optimizer_state, or start your script with torchrun"
                    )
                with hold_run_path(cfg):  # for the whole launch: the workers do not take it
                    launch(cfg)
                return result(cfg)
            local = int(os.environ.get("LOCAL_WORLD_SIZE", env_world_size()))
            if n > 1 and n != local:
                logger.warning("--nproc_per_node %d ignored: the launcher started %d ranks here", n, local)
            with hold_run_path(cfg):
                init_from(cfg)
                return fn(cfg, *args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return deco
