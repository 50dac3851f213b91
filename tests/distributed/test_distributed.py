"""Several workers (torch.distributed, gloo on the CPU, 2 processes) give what one process gives."""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from bergson import BergsonError, build, load_gradients
from bergson.config import DataConfig, EkfacConfig, PreconditionerConfig, ScoreConfig, options_of
from bergson.core.commands import COMMANDS, distributed_commands
from bergson.data import assign_shards
from bergson.distributed import check_command, command_of
from bergson.preconditioning import fit_preconditioner
from bergson.scoring import score
from tests.helpers.cli import run_in_process
from tests.helpers.distributed import assert_same_store, cli, one_cfg, options
from tests.helpers.distributed import reference as reference  # the one-process store (a fixture)
from tests.helpers.stores import make_cfg


def test_one_command_table_for_the_cli_and_the_launcher():
    """The launcher reads the CLI's table: each entry names its module's config, and the
    launcher starts the workers of a config with the command whose entry says it splits."""
    from bergson import cli as command_line
    from bergson import config

    assert command_line.COMMANDS is COMMANDS
    assert set(distributed_commands()) == {
        "build",
        "reduce",
        "score",
        "preconditioner",
        "ekfac",
        "magic",
        "source",
        "trackstar",
        "trak",
    }
    for name, command in COMMANDS.items():
        cls = importlib.import_module(command.module).CONFIG
        assert getattr(config, command.config) is cls, name
        assert command_of(cls.__new__(cls)) == (name if command.workers else None), name


def test_assign_shards_balances_whole_shards():
    costs = [50, 10, 40, 30, 30, 20, 0, 5]
    share = assign_shards(costs, 3)
    assert share == assign_shards(costs, 3)  # the same on every rank
    assert sorted(i for s in share for i in s) == list(range(len(costs)))
    loads = [sum(costs[i] for i in s) for s in share]
    assert max(loads) - min(loads) <= max(costs) and max(loads) <= 65
    assert all(s == sorted(s) for s in share)
    assert assign_shards(costs, 1) == [list(range(len(costs)))]
    assert assign_shards([3], 2) == [[0], []]  # more ranks than shards: some have none


def test_build_on_two_workers_equals_one(tmp_path, model_dir, corpus_file, reference):
    out = tmp_path / "two"
    # the launching process is this one (bergson.cli.main); its workers are fresh processes
    proc = run_in_process(
        "build", str(out), *options(model_dir, corpus_file, "--nproc_per_node", "2"), fds=True
    )
    two = load_gradients(out)
    assert_same_store(reference, two)
    assert two.manifest.producer["world_size"] == 2
    assert len(two.manifest.shards) == 5
    # each rank logs its share: whole shards, balanced, together all five
    shares = {int(r): int(n) for r, n in re.findall(r"rank (\d) of 2: (\d) of 5 shards", proc.stderr)}
    assert sorted(shares) == [0, 1] and sum(shares.values()) == 5 and min(shares.values()) >= 2
    assert "wrote GradientStore" in proc.stdout and proc.stdout.count("wrote") == 1


def test_torchrun_aggregated_store_equals_one_process(tmp_path, model_dir, corpus_file):
    """torchrun launches the same workers; a mean over the dataset sums the ranks' shard sums."""
    one = build(one_cfg(tmp_path, model_dir, corpus_file, "one", aggregation="mean"))
    out = tmp_path / "two"
    run = ("torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "bergson", "build")
    cli(*run, str(out), *options(model_dir, corpus_file, "--aggregation", "mean"))
    two = load_gradients(out)
    assert len(two) == 1 and two.manifest.shards[0]["source_rows"] == 24
    assert_same_store(one, two)


def test_score_on_two_workers_equals_one(tmp_path, model_dir, corpus_file):
    qdata = DataConfig(dataset=str(corpus_file), split="train[3:6]", truncation=True)
    query = build(make_cfg(tmp_path, model_dir, corpus_file, name="query", save_dtype="float32", data=qdata))
    base = one_cfg(tmp_path, model_dir, corpus_file, "one")
    one = score(ScoreConfig(**{**vars(base), "query_path": str(query.root)}))
    out = tmp_path / "two"
    extra = ("--query_path", str(query.root), "--nproc_per_node", "2")
    run_in_process("score", str(out), *options(model_dir, corpus_file, *extra), fds=True)
    two = load_gradients(out)
    assert two.manifest.kind == "scores" and np.asarray(two["scores"]).shape == (24, 3)
    assert_same_store(one, two)


def test_preconditioner_on_two_workers_equals_one(tmp_path, model_dir, corpus_file):
    """Each rank sums its shards' second moments, then one all-reduce (through the Python API,
    which starts the workers itself)."""
    base = one_cfg(tmp_path, model_dir, corpus_file, "one")
    one = fit_preconditioner(options_of(PreconditionerConfig, base))
    two = fit_preconditioner(
        options_of(PreconditionerConfig, base, run_path=str(tmp_path / "two"), nproc_per_node=2)
    )
    assert two.num_rows == one.num_rows == 24 and two.modules == one.modules
    for name in one.modules:
        a, b = one.second_moments[name].numpy(), two.second_moments[name].numpy()
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())


# Test-only fault: on rank 1, raise right after its first shard is written. It is installed
# in the workers as a `sitecustomize` module (imported by Python at start-up from PYTHONPATH),
# so that no hook is needed in bergson itself.
FAULT = """
import os

if os.environ.get("RANK") == "1":
    from bergson.store import writer

    _end_shard = writer.StoreWriter.end_shard

    def end_shard(self, index):
        _end_shard(self, index)
        raise RuntimeError(f"injected fault after shard {index}")

    writer.StoreWriter.end_shard = end_shard
"""


def test_failed_worker_stops_the_run_and_the_rerun_resumes(tmp_path, model_dir, corpus_file, reference):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAULT)
    paths = [str(hook), *filter(None, [os.environ.get("PYTHONPATH")])]
    faulty = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    out = tmp_path / "two"
    args = ("bergson", "build", str(out), *options(model_dir, corpus_file, "--nproc_per_node", "2"))

    failed = cli(*args, env=faulty, check=False)
    assert failed.returncode != 0
    assert "injected fault" in failed.stderr
    assert "rank 1 of 2 failed" in failed.stderr and "rerunning the same command" in failed.stderr
    done = sorted(p.name for p in (out / "shards").glob("*.npy"))
    assert 1 <= len(done) < 5
    with pytest.raises(BergsonError, match="still being written"):
        load_gradients(out)

    resumed = run_in_process(*args[1:], fds=True)  # the same command, launched from this process
    assert f"{len(done)} of 5 shards already complete; resuming" in resumed.stderr
    assert_same_store(reference, load_gradients(out))


def test_single_process_work_is_refused_on_several_workers(tmp_path, model_dir, corpus_file, reference):
    base = one_cfg(tmp_path, model_dir, corpus_file, "scores")
    cfg = ScoreConfig(**{**vars(base), "query_path": str(reference.root), "index": str(reference.root)})
    with pytest.raises(BergsonError, match=r"--index .*runs in one process; drop --nproc_per_node"):
        score(replace(cfg, nproc_per_node=2))
    with pytest.raises(BergsonError, match="mixing preconditioners"):
        fit_preconditioner(
            PreconditionerConfig(run_path=str(tmp_path / "p"), mix_train="a", mix_query="b", nproc_per_node=2)
        )
    with pytest.raises(BergsonError, match="bergson query does not run on several processes"):
        check_command("query", SimpleNamespace(nproc_per_node=2))
    check_command("ekfac", EkfacConfig(nproc_per_node=2))  # ekfac splits its documents
    with pytest.raises(BergsonError, match="--nproc_per_node 0"):
        build(replace(base, nproc_per_node=0))
    assert not (tmp_path / "scores").exists()


def test_trackstar_on_two_workers_equals_one(tmp_path, model_dir, corpus_file):
    """Statistics, query store and scores split their shards over the ranks; rank 0 fits and
    mixes the preconditioners and writes the summary: the same scores as one process."""
    from bergson import trackstar
    from bergson.config import TrackstarConfig

    query = DataConfig(dataset=str(corpus_file), split="train[20:23]", truncation=True)
    base = one_cfg(tmp_path, model_dir, corpus_file, "one")
    # TrackStar's default: unit-normalized
    cfg = options_of(
        TrackstarConfig, base, unit_normalize=True, query=query, stats_documents=12, downweight_components=2
    )
    one = trackstar(cfg)
    out = tmp_path / "two"
    extra = ("--query.dataset", str(corpus_file), "--query.split", "train[20:23]", "--query.truncation",
             "--stats_documents", "12", "--downweight_components", "2", "--nproc_per_node", "2")  # fmt: skip
    proc = run_in_process("trackstar", str(out), *options(model_dir, corpus_file, *extra), fds=True)
    assert proc.stdout.count("wrote") == 1  # the launcher reports
    two = load_gradients(out / "scores")
    assert two.manifest.producer["world_size"] == 2
    drop = ("sha256", "path")  # the mixed preconditioners differ by float rounding, and in location
    assert {k: v for k, v in two.manifest.preconditioner.items() if k not in drop} == {
        k: v for k, v in one.manifest.preconditioner.items() if k not in drop
    }
    np.testing.assert_array_equal(two.rows["row_id"], one.rows["row_id"])
    a, b = np.asarray(one["scores"], np.float64), np.asarray(two["scores"], np.float64)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())
    assert (out / "summary.md").is_file() and (out / "mixed").is_dir()
