"""Numeric options are checked at parse time against the one table of ranges (bergson.config.limits)."""

from __future__ import annotations

import dataclasses
import importlib
import typing

import pytest

from bergson import IndexConfig
from bergson.cli import COMMANDS, main, parse
from bergson.config import DataConfig
from bergson.config.cascade import CASCADE_CONFIGS
from bergson.config.limits import LIMITS, Limit, check_limits, limit_of
from bergson.config.options import validate_options
from bergson.errors import BergsonError
from tests.helpers.cli import run


def config_class(command: str) -> type:
    return importlib.import_module(COMMANDS[command].module).CONFIG


def numeric_fields(cls: type) -> list[tuple[type, str]]:
    """(class, field) of every int or float option of a config, nested groups included."""
    out = []
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        inner = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if isinstance(inner, type) and dataclasses.is_dataclass(inner):
            out += numeric_fields(inner)
            continue
        args = typing.get_args(hints[f.name]) or (hints[f.name],)
        if any(a in (int, float) for a in args) and hints[f.name] is not bool:
            out.append((cls, f.name))
    return out


CONFIGS = [config_class(c) for c in COMMANDS] + list(CASCADE_CONFIGS.values())  # score --candidates
ALL = sorted({(cls, name) for c in CONFIGS for cls, name in numeric_fields(c)}, key=str)


def test_every_numeric_option_has_a_range_and_every_range_an_option():
    missing = [f"{cls.__name__}.{name}" for cls, name in ALL if limit_of(cls, name) is None]
    assert not missing, f"numeric options without an entry in LIMITS: {missing}"
    used = {name for _, name in ALL} | {f"{cls.__name__}.{name}" for cls, name in ALL}
    assert set(LIMITS) <= used, f"LIMITS entries no option has: {set(LIMITS) - used}"
    assert len(ALL) > 40  # the walk finds the options (max_length, top_k, training.lr, ...)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_defaults_are_in_range(command):
    check_limits(config_class(command)())


def test_limit_boundaries():
    assert Limit(low=2).accepts(2) and not Limit(low=2).accepts(1)
    assert Limit(low=0, open_low=True).accepts(1e-9) and not Limit(low=0, open_low=True).accepts(0)
    decay = Limit(low=0, high=1, open_high=True)
    assert decay.accepts(0) and decay.accepts(0.999) and not decay.accepts(1)
    assert Limit(low=2, zero="off").accepts(0) and not Limit(low=2, zero="off").accepts(1)
    assert not Limit(low=0).accepts(float("nan")) and not Limit(low=0).accepts(float("inf"))


BAD = [
    (["build", "r", "--max_length", "-5"], "--max_length -5: must be >= 2"),
    (["build", "r", "--data.max_length", "1"], "--max_length 1: must be >= 2"),
    (["build", "r", "--token_batch_size", "1"], "--token_batch_size 1: must be >= 2"),
    (["build", "r", "--projection_dim", "-1"], "--projection_dim -1: must be 0 (full gradients) or >= 1"),
    (["build", "r", "--shard_size", "0"], "--shard_size 0: must be >= 1"),
    (["build", "r", "--nproc_per_node", "0"], "--nproc_per_node 0: must be >= 1"),
    (["build", "r", "--chunk_length", "1"], "--chunk_length 1: must be 0 (off) or >= 2"),
    (["build", "r", "--projection_seed", "-3"], "--projection_seed -3: must be >= 0"),
    (["trackstar", "r", "--damping", "-0.5"], "--damping -0.5: must be >= 0"),
    (["trackstar", "r", "--query.max_length", "0"], "--query.max_length 0: must be >= 2"),
    (["ekfac", "r", "--query_rank", "-1"], "--query_rank -1: must be 0 (full) or >= 1"),
    (["query", "--top_k", "0"], "--top_k 0: must be >= 1"),
    (["score", "r", "--top_k", "-1"], "--top_k -1: must be 0 (none printed) or >= 1"),
    (["magic", "--training.lr", "0"], "--training.lr 0.0: must be > 0"),
    (["magic", "--training.beta2", "1"], "--training.beta2 1.0: must be >= 0 and < 1"),
    (["magic", "--memory_budget_gb", "nan"], "--memory_budget_gb nan: must be >= 0"),
    (["validate", "r", "--fraction", "1.5"], "--fraction 1.5: must be > 0 and < 1"),
    (["query", "--faiss.nprobe", "0"], "--faiss.nprobe 0: must be >= 1"),
    (["serve", "--port", "70000"], "--port 70000: must be >= 0 and <= 65535"),
    (["preconditioner", "r", "--dist_timeout", "0"], "--dist_timeout 0.0: must be > 0"),
]


@pytest.mark.parametrize(
    ("args", "message"), BAD, ids=[" ".join(a[2:] if a[1] == "r" else a[1:]) for a, _ in BAD]
)
def test_out_of_range_is_refused_at_parse_time(args, message, capsys):
    # nothing else is given (no model, no dataset): the range check comes before anything is read
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert message in err and "leave the option out (default:" in err and "Traceback" not in err


def test_values_at_the_edge_are_accepted():
    cfg = parse("build", ["r", "--projection_dim", "0", "--chunk_length", "0", "--token_batch_size", "2"])
    assert (cfg.projection_dim, cfg.data.chunk_length, cfg.token_batch_size) == (0, 0, 2)
    assert parse("serve", ["--port", "0"]).port == 0
    assert parse("magic", ["--training.beta1", "0"]).training.beta1 == 0


def test_python_configs_are_checked_too():
    with pytest.raises(BergsonError, match="--token_batch_size 1: must be >= 2"):
        validate_options(IndexConfig(run_path="r", data=DataConfig(dataset="d"), token_batch_size=1))
    with pytest.raises(BergsonError, match="--max_length -5: must be >= 2"):
        DataConfig(dataset="d", max_length=-5)._check()


def test_negative_max_length_fails_from_the_command_line(tmp_path, model_dir, corpus_file):
    # before: accepted, and with --truncation a store of 24 rows was written
    out = tmp_path / "r"
    proc = run("build", str(out), "--model", str(model_dir), "--dataset", str(corpus_file),
               "--max_length", "-5", "--truncation", check=False)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "--max_length -5: must be >= 2" in proc.stderr
    assert not out.exists()
