"""Every command offers exactly the options it reads.

For each command: ``--help`` lists every field of its config (and nothing else), and a few
runs on tiny local assets — one with many options set, the others combinations the command
refuses with a clear error — read every one of its options (recorded by
:mod:`tests.helpers.option_reads`). An option that no run reads would be accepted and ignored.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
import threading
import typing
import urllib.request
from pathlib import Path

import pytest

from bergson import config as C
from bergson.cli import COMMANDS, main
from tests.helpers.option_reads import recording

NESTED = (C.DataConfig, C.FaissConfig, C.TrainingConfig)


def config_class(command: str) -> type:
    return importlib.import_module(COMMANDS[command][0]).CONFIG


def option_names(cls: type, prefix: str = "") -> set[str]:
    """``(class, field)`` names of a config and of its nested groups, as the recorder names them."""
    out = set()
    for f in dataclasses.fields(cls):
        out.add((cls.__name__, f.name))
        inner = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if isinstance(inner, type) and dataclasses.is_dataclass(inner):
            out |= option_names(inner)
    return out


def flags(cls: type, prefix: str = "") -> set[str]:
    """The command-line flags of a config's fields (nested groups as ``group.field``)."""
    out = set()
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        inner = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if isinstance(inner, type) and dataclasses.is_dataclass(inner):
            out |= flags(inner, f"{prefix}{f.name}.")
        elif not any("Positional" in repr(m) for m in getattr(hints[f.name], "__metadata__", ())):
            out.add(f"{prefix}{f.name}")
    return out


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_lists_exactly_the_options(command, capfd):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    lines = [ln for ln in capfd.readouterr().out.splitlines() if ln.startswith("│ -")]
    shown = {flag for ln in lines for flag in re.findall(r"--([a-z0-9_.]+)", ln)} - {"help"}
    shown = {s for s in shown if not (s.startswith("no_") or ".no_" in s)}
    aliases = {"unit_norm"}
    assert shown - aliases == flags(config_class(command))


def runs(tmp: Path, model: str, corpus: str) -> dict[str, list[tuple[list[str], str | None]]]:
    """Per command: (arguments, None for a run that must succeed or a pattern its error must
    match). Refused runs read the options they refuse; each writes to a run path of its own."""
    m = ["--model", model, "--device", "cpu", "--precision", "fp32"]
    d = ["--dataset", corpus, "--split", "train[:6]", "--truncation", "--max_length", "24"]
    heads = "gpt_neox.layers.0.attention.query_key_value=2:48:out"
    collect = ["--token_batch_size", "64", "--projection_dim", "4", "--projection_seed", "1", "--include_bias",
               "--modules", "gpt_neox.layers.*", "--loss_reduction", "mean", "--shard_size", "4",
               "--revision", "main", "--force_math_sdp"]  # fmt: skip
    count = iter(range(1000))
    new = lambda: str(tmp / f"run{next(count)}")  # noqa: E731
    refused_everywhere = [
        ([new(), *m, *d, "--dist_timeout", "5"], "--dist_timeout 5.0: it is how long"),
        ([new(), *m, *d, "--normalizer_form", "adam"], "--normalizer_form adam: it says how"),
        ([new(), *m, *d, "--data.subset", "en"], "--subset en: it names a configuration"),
        ([new(), *m, *d, "--optimizer_state", str(tmp / "missing.pt")], "missing.pt: no such file"),
    ]
    return {
        "build": [
            ([new(), *m, *d, *collect, "--attention_heads", heads, "--per_token", "--save_dtype", "float32",
              "--unit_normalize", "--overwrite", "--fsdp", "--nproc_per_node", "1", "--use_tf32_matmuls",
              "--no_trust_remote_code"], None),  # fmt: skip
            ([new(), *m, *d, "--aggregation", "mean", "--prompt_column", "text"], None),
            ([new(), *m, *d, "--preconditioner_path", str(tmp / "missing")], "--preconditioner_path"),
            ([new(), *m, *d, "--completion_column", "nope"], "nope"),
            ([new(), *m, *d, "--conversation_column", "nope"], "nope"),
            ([new(), *m, *d, "--reward_column", "nope"], "--reward_column needs --completion_column"),
            *refused_everywhere,
        ],
    }


@pytest.mark.parametrize("command", ["build"])
def test_every_option_is_read(command, tmp_path, model_dir, corpus_file, capfd):
    cls = config_class(command)
    read: set[tuple[str, str]] = set()
    failures = []
    for args, refusal in runs(tmp_path, str(model_dir), str(corpus_file))[command]:
        with recording([cls, *NESTED]) as reads:
            try:
                main([command, *args])
                code = 0
            except SystemExit as e:
                code = e.code
        err = capfd.readouterr().err
        if refusal is None and code != 0:
            failures.append(f"{args[-4:]} failed: {err[-300:]}")
        elif refusal is not None and (code == 0 or refusal not in err or "Traceback" in err):
            failures.append(f"{args[-4:]} was not refused with {refusal!r} (exit {code}): {err[-300:]}")
        read |= reads
    assert not failures, "\n".join(failures)
    unread = sorted(option_names(cls) - read)
    assert not unread, f"bergson {command} accepts options it never reads: {unread}"
