"""The command line as a user types it: in a subprocess (``run``), or through the same entry point
in this process (``run_in_process``), which spares the ~4 s of imports a fresh interpreter pays.

Use ``run`` where the process boundary is what a test checks (the exit status the shell sees, no
traceback from the interpreter, torchrun launches); ``run_in_process`` elsewhere. Both return a
``subprocess.CompletedProcess`` with the exit code, stdout and stderr (log lines included).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import traceback
from pathlib import Path


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "bergson", *args], capture_output=True, text=True, timeout=300
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_in_process(
    *args: str, check: bool = True, cwd: str | Path | None = None, stdin: str = "", fds: bool = False
) -> subprocess.CompletedProcess:
    """``bergson ARGS`` through ``bergson.cli.main`` in this process, from ``cwd``, with ``stdin``.

    What the shell would see: the exit status of ``SystemExit`` (0 when main returns); an exception
    escaping main is what the interpreter would do with it: its traceback on stderr and status 1.
    The log lines go to the captured stderr with the CLI's format, as in a fresh process. With
    ``fds``, what child processes (the workers of ``--nproc_per_node``) write to the inherited
    file descriptors 1 and 2 is captured too, after this process's own output.
    """
    from bergson import cli

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("bergson: %(message)s"))
    root, ours = logging.getLogger(), logging.getLogger("bergson")
    levels = root.level, ours.level
    root.addHandler(handler)  # also makes main's logging.basicConfig a no-op, as it must be here
    root.setLevel(logging.INFO)
    here = os.getcwd()
    code = 0
    try:
        if cwd is not None:
            os.chdir(cwd)
        with (
            _descriptors(fds) as children,
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
            _stdin(io.StringIO(stdin)),
        ):
            try:
                cli.main(list(args))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if e.code is not None and not isinstance(e.code, int):
                    print(e.code, file=sys.stderr)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(here)
        root.removeHandler(handler)
        root.setLevel(levels[0])
        ours.setLevel(levels[1])
        cli._DEBUG = False
    proc = subprocess.CompletedProcess(
        ["bergson", *args], code, out.getvalue() + children[0], err.getvalue() + children[1]
    )
    if check and code != 0:
        raise AssertionError(f"exit {code}\n{proc.stdout}\n{proc.stderr}")
    return proc


@contextlib.contextmanager
def _stdin(stream: io.StringIO):
    saved = sys.stdin
    sys.stdin = stream
    try:
        yield
    finally:
        sys.stdin = saved


@contextlib.contextmanager
def _descriptors(capture: bool):
    """File descriptors 1 and 2 pointed at temporary files inside the block (when ``capture``);
    yields a list that holds their texts (stdout, stderr) once the block is left."""
    texts = ["", ""]
    if not capture:
        yield texts
        return
    import tempfile

    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as o, tempfile.TemporaryFile() as e:
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(o.fileno(), 1)
            os.dup2(e.fileno(), 2)
            yield texts
        finally:
            for fd, keep in enumerate(saved, 1):
                os.dup2(keep, fd)
                os.close(keep)
            for i, f in enumerate((o, e)):
                f.seek(0)
                texts[i] = f.read().decode(errors="replace")
