"""The ``bergson`` command line: one small module per subcommand.

The commands are the one table :data:`COMMANDS` (:mod:`bergson.core.commands`, which the
launcher reads too). Configs are parsed with tyro from the dataclasses in :mod:`bergson.config`
(field docstrings become ``--help`` text). ``--config FILE.yaml`` loads the same dataclass from
YAML; flags given after it override the file. Options of a command's ``data`` group
may be written without the ``data.`` prefix (``--dataset`` == ``--data.dataset``).

``bergson FILE.yaml`` runs a pipeline: a top-level ``steps:`` list of one-key mappings
``{command: {options}}``, in order, stopping at the first step that fails. The original
bergson package's spellings of options (``--index_cfg.precision``, ``--distributed.nproc_per_node``,
MAGIC's ``batch_size``/``num_epochs``/``lr_schedule``, query's ``--faiss``) are read through the one
table :data:`bergson.config.io.ALIASES`; ``--debug`` logs at DEBUG level and prints tracebacks.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import errno
import importlib
import logging
import os
import re
import sys
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from ..core.commands import COMMANDS
from ..errors import BergsonError


def _usage() -> str:
    lines = [
        "usage: bergson COMMAND [OPTIONS]   (bergson COMMAND --help for its options)",
        "       bergson FILE.yaml           (a pipeline: a `steps:` list of `- COMMAND: {OPTIONS}`)",
        "",
        "commands:",
    ]
    width = max(map(len, COMMANDS))
    lines += [f"  {name:<{width}} {command.summary}" for name, command in COMMANDS.items()]
    return "\n".join(lines)


def _expand_group_aliases(cls: type, args: list[str], group: str = "data") -> list[str]:
    """Rewrite ``--field`` to ``--group.field`` for fields of the group the command lacks."""
    names = {f.name for f in dataclasses.fields(cls)}
    group_field = next((f for f in dataclasses.fields(cls) if f.name == group), None)
    if group_field is None:
        return args
    group_cls = group_field.default_factory  # type: ignore[misc]
    inner = {f.name for f in dataclasses.fields(group_cls)}  # type: ignore[arg-type]
    out = []
    for arg in args:
        if arg.startswith("--") and "." not in arg.split("=", 1)[0]:
            flag, eq, value = arg[2:].partition("=")
            key = flag.replace("-", "_")
            base = key.removeprefix("no_")
            if base in inner and base not in names:
                arg = f"--{group}.{key}{eq}{value}"
        out.append(arg)
    return out


def _split_config(args: list[str]) -> tuple[str | None, list[str]]:
    rest, path = [], None
    it = iter(args)
    for arg in it:
        if arg == "--config":
            path = next(it, None)
            if path is None:
                raise BergsonError("--config needs a YAML file path")
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return path, rest


def _is_yaml(arg: str) -> bool:
    return arg.endswith((".yaml", ".yml")) and not arg.startswith("-")


def original_flags(cls: type, args: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Read the flags spelled as in the original package (the table :data:`bergson.config.io.ALIASES`):
    a group prefix (``--index_cfg.precision``) or a plain rename (``--distributed.nproc_per_node``)
    becomes our flag; the others (``--faiss``, ``--batch_size``, ``--debug``, ...) are taken out,
    with their values, for :func:`bergson.config.io.translate`."""
    import yaml

    from ..config.io import ALIASES, leaf_options, strip_prefixes

    ours = leaf_options(cls)
    rest: list[str] = []
    taken: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("--") or arg == "--":
            rest.append(arg)
            continue
        flag, eq, value = arg[2:].partition("=")
        name = strip_prefixes(flag.replace("-", "_"), ours)
        base = name.removeprefix("no_")
        if base in ours or base == "help":
            rest.append(f"--{name}{eq}{value}")
            continue
        alias = ALIASES.get(name)
        if alias is None and name != "debug":
            rest.append(f"--{name}{eq}{value}")  # a data option without its prefix, or unrecognized
            continue
        if alias is not None and alias.to in ours and alias.values is None and not alias.recipe:
            rest.append(f"--{alias.to}{eq}{value}")  # a plain rename: tyro reads the value
            continue
        if not eq:
            switch = name == "debug" or (
                alias is not None and alias.values is not None and True in alias.values
            )
            nxt = args[i] if i < len(args) and not args[i].startswith("--") else None
            if nxt is not None and (not switch or isinstance(yaml.safe_load(nxt), bool)):
                value, i = nxt, i + 1  # a switch takes only true/false, not the positional after it
            else:
                value = "true"
        taken[name] = yaml.safe_load(value)
    return rest, taken


def parse_with_notes(
    command: str, args: Sequence[str], values: dict[str, Any] | None = None, where: str = ""
) -> tuple[Any, list[str], bool]:
    """Parse a subcommand's arguments (over ``values``, a pipeline step's options) into its config
    dataclass; also returns what was announced about other spellings and whether --debug was given."""
    import tyro

    from ..config.io import flatten, from_dict, read_steps, read_yaml, translate
    from ..config.limits import check_limits

    module = importlib.import_module(COMMANDS[command].module)
    path, rest = _split_config(list(args))
    if path is None and rest and _is_yaml(rest[0]):
        path = rest.pop(0)  # `bergson magic config.yaml`: a leading YAML file is the config
    raw: dict[str, Any] = {}
    if path:
        steps = read_steps(path, COMMANDS)
        if steps is None:
            raw, where = read_yaml(path), path
        elif len(steps) == 1 and steps[0][0] == command:
            raw, where = steps[0][1], f"{path} (step 1, {command})"
        else:
            names = ", ".join(name for name, _ in steps)
            raise BergsonError(f"{path} is a pipeline ({names}); run it as `bergson {path}`")
    if values is not None:
        raw = values
    # a command whose options depend on a flag (score --candidates) chooses its config class
    cls = module.config_for(rest, raw) if hasattr(module, "config_for") else module.CONFIG
    rest, taken = original_flags(cls, rest)
    rest = _expand_group_aliases(cls, rest)
    notes: list[str] = []
    merged = {**flatten(raw), **taken}
    debug = translate(cls, merged, where or "flags").debug
    default = from_dict(cls, merged, where=where or "flags", notes=notes) if merged else None
    cfg = tyro.cli(
        cls,
        args=rest,
        default=default,
        prog=f"bergson {command}",
        description=COMMANDS[command].summary + " Pass --config FILE.yaml to read options from YAML. "
        "The original bergson package's spellings (--index_cfg.X, --distributed.nproc_per_node, --debug, "
        "query's --faiss, MAGIC's batch_size / num_epochs / lr_schedule.*) are accepted too.",
        use_underscores=True,
    )
    check_limits(cfg)  # numeric options out of range fail here, before anything is loaded
    return cfg, notes, debug


def parse(command: str, args: Sequence[str]) -> Any:
    """Parse a subcommand's arguments into its config dataclass."""
    return parse_with_notes(command, args)[0]


def _record(cfg: Any, command: str, notes: list[str], where: str) -> None:
    """Keep what was announced about a run's options in its run directory (other_spellings.json;
    a stale one from an earlier run is removed)."""
    import json

    root = getattr(cfg, "run_path", "")
    if not root or not os.path.isdir(root):
        return
    path = Path(root) / OTHER_SPELLINGS
    if notes:
        from ..core.files import atomic_write_bytes

        record = {"command": command, "source": where, "announced": notes}
        atomic_write_bytes(path, json.dumps(record, indent=2).encode())
    elif path.is_file():
        path.unlink()


OTHER_SPELLINGS = "other_spellings.json"
PIPELINE_FILE = "pipeline.yaml"
"""Where a pipeline with a top-level run_path writes its resolved steps (bergson's spelling)."""
_DEBUG = False
"""Whether --debug (or a step's ``debug: true``) was given: DEBUG logging and full tracebacks."""


def _run(command: str, args: Sequence[str], values: dict[str, Any] | None = None, where: str = "") -> Any:
    from .. import distributed

    global _DEBUG
    cfg, notes, debug = parse_with_notes(command, args, values, where)
    if debug and not _DEBUG:
        _DEBUG = True
        logging.getLogger("bergson").setLevel(logging.DEBUG)
    distributed.check_command(command, cfg)
    from ..distributed.launch import hold_run_path

    try:
        with hold_run_path(cfg, command):
            importlib.import_module(COMMANDS[command].module).run(cfg)
    except OSError as e:
        error = disk_error(e, getattr(cfg, "run_path", "") or None)
        if error is None:
            raise
        raise error from e
    if distributed.env_rank() == 0:
        _record(cfg, command, notes, where or "flags")
    return cfg


_DISK_ERRORS = {
    errno.ENOSPC: (
        "the disk is full",
        "free space there (or choose a run_path on another disk) and rerun the same command: the "
        "completed shards and stages are kept, and the run resumes from them",
    ),
    errno.EDQUOT: (
        "the disk quota is used up",
        "free space within the quota (or choose a run_path on another disk) and rerun the same "
        "command: the completed shards and stages are kept, and the run resumes from them",
    ),
    errno.EROFS: (
        "the filesystem is read-only",
        "choose a run_path on a writable disk (or remount it writable) and rerun",
    ),
    errno.EACCES: (
        "permission denied",
        "make it readable if it is an input, or choose a run_path you may write to (or fix the "
        "directory's permissions) and rerun",
    ),
}


def disk_error(e: OSError, run_path: str | None) -> BergsonError | None:
    """A clean error for an ``OSError`` of writing output (a full disk, a read-only or forbidden
    directory), naming the file and the fix; None for other errors."""
    if e.errno not in _DISK_ERRORS:
        return None
    what, fix = _DISK_ERRORS[e.errno]
    where = e.filename or run_path
    if e.filename and re.fullmatch(r"\..+\.\d+\.[0-9a-f]+\.tmp", Path(str(e.filename)).name):
        where = str(Path(str(e.filename)).parent)  # an atomic write's temporary file: name its directory
    if where is None:
        return None
    verb = "cannot access" if e.errno == errno.EACCES else "cannot write"
    target = (
        f" (run_path {run_path})" if run_path and e.filename and str(run_path) not in str(e.filename) else ""
    )
    return BergsonError(f"{verb} {where}{target}: {what} ([Errno {e.errno}]); {fix}")


def _pipeline(args: list[str]) -> tuple[str, list[tuple[str, dict[str, Any]]]] | None:
    """``bergson FILE.yaml``, ``bergson COMMAND FILE.yaml`` or ``bergson COMMAND --config FILE.yaml``
    naming a file with ``steps:``: the file and its steps."""
    from ..config.io import read_steps

    if args and _is_yaml(args[0]):
        path, rest = args[0], args[1:]
    elif len(args) > 1 and args[0] in COMMANDS:
        path, rest = _split_config(args[1:])
        if path is None and rest and _is_yaml(rest[0]):
            path, rest = rest[0], rest[1:]
        if path is None:
            return None
    else:
        return None
    steps = read_steps(path, COMMANDS)
    if steps is None:
        if args[0] == path:
            raise BergsonError(
                f"{path} holds one command's options; run it as `bergson COMMAND --config {path}`"
            )
        return None
    if args[0] in COMMANDS and len(steps) == 1 and steps[0][0] == args[0]:
        return None  # one step of this command: flags after the file override its options
    if args[0] in COMMANDS and any(name != args[0] for name, _ in steps):
        names = ", ".join(name for name, _ in steps)
        raise BergsonError(f"{path} is a pipeline ({names}); run it as `bergson {path}`")
    if rest:
        raise BergsonError(
            f"{path} is a pipeline: flags after it ({' '.join(rest)}) are not applied; put them in its steps"
        )
    return path, steps


def _debug_asked(args: list[str]) -> bool:
    return "--debug" in args or "--debug=true" in args or "--debug=True" in args


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        sys.exit(0 if args else 2)
    if args[0] in ("-V", "--version"):
        from .. import __version__

        print(f"bergson {__version__}")
        return
    command = args[0]
    if command not in COMMANDS and not _is_yaml(command):
        print(f"bergson: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        sys.exit(2)
    from .. import distributed

    # each worker of a launch logs with its rank; errors name it (the launcher stops the others)
    where = f" (rank {distributed.env_rank()})" if distributed.env_world_size() > 1 else ""
    global _DEBUG
    debug = _DEBUG = _debug_asked(args)
    logging.basicConfig(level=logging.INFO, format=f"bergson{where}: %(message)s")
    if debug:
        logging.getLogger("bergson").setLevel(logging.DEBUG)
    from ..core.allocator import keep_freed_memory

    keep_freed_memory()
    code = 0
    label = command
    try:
        pipeline = _pipeline(args)
        if pipeline is None:
            _run(command, args[1:])
        else:
            from ..config.io import pipeline_run_path, save_pipeline

            path, steps = pipeline
            done = []
            for i, (name, values) in enumerate(steps, 1):
                label = f"{path} step {i}/{len(steps)} ({name})"
                if len(steps) > 1:
                    print(f"bergson: {label}")
                done.append((name, _run(name, [], values, f"{path} (step {i}, {name})")))
            root = pipeline_run_path(path)
            if root and distributed.env_rank() == 0:
                save_pipeline(Path(root) / PIPELINE_FILE, done)
                print(f"wrote the resolved steps to {Path(root) / PIPELINE_FILE}")
    except BergsonError as e:
        if _DEBUG:
            traceback.print_exc()
        print(f"bergson {label}{where}: error: {e}", file=sys.stderr)
        code = distributed.PEER_EXIT if isinstance(e, distributed.PeerError) else 1
    except KeyboardInterrupt:
        print(f"bergson {label}{where}: interrupted; rerun the same command to resume", file=sys.stderr)
        code = 130
    except Exception as e:
        if not where and label == command and not _DEBUG:
            raise
        traceback.print_exc()
        print(f"bergson {label}{where}: failed: {type(e).__name__}: {e}", file=sys.stderr)
        code = 1
    if code == 0:
        distributed.shutdown()
    if where:
        _leave_worker(code)
    if code:
        sys.exit(code)


def entry() -> NoReturn:
    """The ``bergson`` program (the console script and ``python -m bergson``): :func:`main`, then
    an exit that skips the interpreter's teardown of every imported module.

    After a small build that teardown (torch's and transformers' modules, one by one) takes
    about 0.75 s, longer than the build's own gradient pass, and a finished command needs none
    of it: its files are written and closed. What an exit must do still happens: the ``atexit``
    handlers run (logging, temporary directories, multiprocessing) and the standard streams are
    flushed. While another non-daemon thread is alive, under a profiler, debugger or coverage
    tracer (``python -m cProfile -m bergson ...`` writes its profile after the program ends), or
    when the command ends with an unexpected exception, the interpreter exits the ordinary way.
    """
    try:
        main()
    except SystemExit as e:
        if e.code is not None and not isinstance(e.code, int):
            raise
        _exit_now(e.code or 0)
    _exit_now(0)


def _exit_now(code: int) -> NoReturn:
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    watched = sys.getprofile() is not None or sys.gettrace() is not None  # a profiler, debugger or coverage
    if watched or any(t.is_alive() for t in others):  # they write their results after the program ends
        sys.exit(code)
    atexit._run_exitfuncs()  # the handlers a normal exit would run
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: nothing left to flush into
            stream.flush()
    os._exit(code)


def _leave_worker(code: int) -> NoReturn:
    """End a worker of a launch without the interpreter's finalization.

    Its work is done and its files are closed, but the process group's C++ threads may still
    hold tensors (FSDP's gathers, gloo's asynchronous work); destroying those while Python
    shuts down can abort the process (SIGABRT, "terminate called without an active
    exception"), which would turn a finished rank into a failed one.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def report_store(store: Any, scores: str | None = None, top_k: int = 0, label: str = "column") -> bool:
    """Print what a command wrote (on the process that reports: the launcher or rank 0): the store,
    how its scores are oriented and the ``top_k`` rows of each column. False on other ranks."""
    from ..distributed import reports

    if not reports():  # a worker of a launch: the launching process (or rank 0) prints
        return False
    print(f"wrote {store!r}")
    if scores is not None:
        print(f"scores: {scores}")
    if top_k:
        print_top_rows(store, top_k, label)
    return True


def print_top_rows(store: Any, k: int, label: str = "column") -> None:
    """The ``k`` highest-scoring rows of each column of a scores store, one block per column."""
    from ..store.scores import top_rows

    for col, hits in enumerate(top_rows(store, k)):
        print(f"{label} {col}:")
        for rank, (row, value) in enumerate(hits, 1):
            print(f"  {rank:3d}. row {row:8d}  score {value:+.5g}")
