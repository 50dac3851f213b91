"""The ``bergson`` command line: one small module per subcommand.

The commands are the one table :data:`COMMANDS` (:mod:`bergson.core.commands`, which the
launcher reads too). Configs are parsed with tyro from the dataclasses in :mod:`bergson.config`
(field docstrings become ``--help`` text). ``--config FILE.yaml`` loads the same dataclass from
YAML; flags given after it override the file. Options of a command's ``data`` group
may be written without the ``data.`` prefix (``--dataset`` == ``--data.dataset``).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

from ..core.commands import COMMANDS
from ..errors import BergsonError


def _usage() -> str:
    lines = ["usage: bergson COMMAND [OPTIONS]   (bergson COMMAND --help for its options)", "", "commands:"]
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


def parse(command: str, args: Sequence[str]) -> Any:
    """Parse a subcommand's arguments into its config dataclass."""
    import tyro

    from ..config import load_yaml

    cls = importlib.import_module(COMMANDS[command].module).CONFIG
    path, rest = _split_config(list(args))
    if path is None and rest and rest[0].endswith((".yaml", ".yml")) and not rest[0].startswith("-"):
        path = rest.pop(0)  # `bergson magic config.yaml`: a leading YAML file is the config
    default = load_yaml(cls, path) if path else None
    rest = _expand_group_aliases(cls, rest)
    return tyro.cli(
        cls,
        args=rest,
        default=default,
        prog=f"bergson {command}",
        description=COMMANDS[command].summary + " Pass --config FILE.yaml to read options from YAML.",
        use_underscores=True,
    )


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
    if command not in COMMANDS:
        print(f"bergson: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        sys.exit(2)
    from .. import distributed

    # each worker of a launch logs with its rank; errors name it (the launcher stops the others)
    where = f" (rank {distributed.env_rank()})" if distributed.env_world_size() > 1 else ""
    logging.basicConfig(level=logging.INFO, format=f"bergson{where}: %(message)s")
    code = 0
    try:
        cfg = parse(command, args[1:])
        distributed.check_command(command, cfg)
        importlib.import_module(COMMANDS[command].module).run(cfg)
    except BergsonError as e:
        print(f"bergson {command}{where}: error: {e}", file=sys.stderr)
        code = distributed.PEER_EXIT if isinstance(e, distributed.PeerError) else 1
    except KeyboardInterrupt:
        print(f"bergson {command}{where}: interrupted; rerun the same command to resume", file=sys.stderr)
        code = 130
    except Exception as e:
        if not where:
            raise
        traceback.print_exc()
        print(f"bergson {command}{where}: failed: {type(e).__name__}: {e}", file=sys.stderr)
        code = 1
    if code == 0:
        distributed.shutdown()
    if where:
        _leave_worker(code)
    if code:
        sys.exit(code)


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
