"""An exclusive lock on a run directory, so that two commands never write one run at once.

The lock is a small JSON file beside the directory (``PARENT/.NAME.bergson-lock``, so that the
run directory itself holds only what the command writes) naming its holder: host, pid, command
and start time. The holder keeps an ``flock`` on it for as long as it runs; the kernel drops
that lock when the process dies, however it dies, so a lock file whose ``flock`` can be taken is
stale: its holder is gone. A second writer refuses with the holder named; a stale lock is
taken over with a warning. On a filesystem without ``flock`` the pid is checked instead (a lock
of this host whose pid is dead is stale; one of another host is refused, with how to remove it).

Locks are per run directory and re-entrant within a process (the command line and the
command's entry point may both ask). Which process of a launch of several takes it is the
caller's choice (:func:`bergson.distributed.launch.entry`: the launching process, or rank 0
under torchrun).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import BergsonError

logger = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

_HELD: dict[str, tuple[RunLock, int]] = {}
"""The locks this process holds, by lock file path, with how many times each was taken."""


def lock_path(run_path: str | Path) -> Path:
    """The lock file of the run directory ``run_path`` (beside it, hidden)."""
    root = Path(os.path.abspath(os.path.expanduser(str(run_path))))
    with contextlib.suppress(OSError):
        root = root.resolve()
    return root.parent / f".{root.name or 'root'}.bergson-lock"


def describe_holder(info: dict[str, Any]) -> str:
    return (
        f"bergson {info.get('command', '?')} (pid {info.get('pid', '?')} on host {info.get('host', '?')}, "
        f"since {info.get('started', '?')})"
    )


def _read(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _refuse(root: Path, path: Path, info: dict[str, Any]) -> BergsonError:
    return BergsonError(
        f"run_path {root} is in use by {describe_holder(info)}: two commands writing one run directory "
        f"would destroy each other's results; wait for it to finish, or choose another run_path (if that "
        f"process is gone, delete the lock file {path})"
    )


class RunLock:
    """The exclusive lock of one run directory (use as a context manager, or acquire/release)."""

    def __init__(self, run_path: str | Path, command: str):
        self.root = Path(run_path)
        self.path = lock_path(run_path)
        self.command = command
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        key = str(self.path)
        held = _HELD.get(key)
        if held is not None:
            _HELD[key] = (held[0], held[1] + 1)
            return held[0]
        self._take()
        _HELD[key] = (self, 1)
        return self

    def release(self) -> None:
        key = str(self.path)
        held = _HELD.get(key)
        if held is None:
            return
        lock, count = held
        if count > 1:
            _HELD[key] = (lock, count - 1)
            return
        del _HELD[key]
        lock._drop()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # ---------------------------------------------------------------- the file
    def _open(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise BergsonError(
                f"run_path {self.root}: cannot create its lock file {self.path} ({e.strerror}); the "
                "directory that holds run_path must be writable: choose a run_path on a writable disk, "
                "or fix the directory's permissions"
            ) from e

    def _take(self) -> None:
        for _ in range(10):
            fd = self._open()
            flocked = fcntl is not None
            if flocked:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # type: ignore[union-attr]
                except BlockingIOError:
                    os.close(fd)
                    raise _refuse(self.root, self.path, _read(self.path)) from None
                except OSError as e:
                    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                        os.close(fd)
                        raise
                    flocked = False
            try:  # the file may have been released (unlinked) by its holder between open and flock
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise BergsonError(f"run_path {self.root}: could not take its lock {self.path}; retry")
        try:
            self._claim(fd, flocked)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _claim(self, fd: int, flocked: bool) -> None:
        previous = _read(self.path)
        host = socket.gethostname()
        if previous:
            mine = previous.get("host") == host
            if not flocked and (not mine or _pid_alive(previous.get("pid"))):
                raise _refuse(self.root, self.path, previous)
            why = (
                "its process is gone"
                if not mine or not _pid_alive(previous.get("pid"))
                else "its pid now names another process, which does not hold the lock"
            )
            logger.warning(
                "taking over the stale lock of run_path %s left by %s: %s",
                self.root,
                describe_holder(previous),
                why,
            )
        info = {
            "host": host,
            "pid": os.getpid(),
            "command": self.command,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "run_path": str(self.root),
        }
        data = json.dumps(info, indent=2).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)

    def _drop(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # before the flock goes, so that no one locks the old file
        os.close(fd)


@contextlib.contextmanager
def run_lock(run_path: str | Path | None, command: str) -> Iterator[RunLock | None]:
    """Hold the lock of ``run_path`` (None or empty: nothing to lock) while the block runs."""
    if not run_path:
        yield None
        return
    lock = RunLock(run_path, command)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()
