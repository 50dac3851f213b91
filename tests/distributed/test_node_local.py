"""Two machines without a shared filesystem, simulated on one host: two ranks launched by hand
(the torchrun environment set by hand), each in a working directory of its own, writing the
same RELATIVE run_path. Rank 1 cannot see rank 0's store, so it writes a node-local copy and
sends its shards to rank 0 at the end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import bergson
from bergson import build, load_gradients
from bergson.config import DataConfig, ScoreConfig
from bergson.distributed import LAUNCH_MARKER, SPAWNED, free_port
from bergson.scoring import score
from bergson.store.manifest import read_manifest
from tests.helpers.distributed import assert_same_store, one_cfg, options, without
from tests.helpers.distributed import reference as reference  # the one-process store (a fixture)
from tests.helpers.stores import make_cfg

RUN = "runs/index"
TIMEOUT = 300.0
REPO = Path(bergson.__file__).resolve().parents[1]
SMALL_CHUNKS = "import bergson.distributed.transfer\n\nbergson.distributed.transfer.CHUNK_BYTES = 256\n"


def two_machines(tmp_path: Path, command: str, args: list[str], check: bool = True) -> list[str]:
    """``bergson COMMAND RUN args`` on ranks 0 and 1, run in ``tmp_path/node0`` and ``node1``;
    their stderr (every rank's log). A failure or timeout stops both."""
    port = str(free_port())
    hook = tmp_path / "hook"  # small chunks, so that every file goes over in several messages
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SMALL_CHUNKS)
    paths = [str(hook), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    procs, logs = [], []
    try:
        for rank in (0, 1):
            cwd = tmp_path / f"node{rank}"
            cwd.mkdir(exist_ok=True)
            env = {k: v for k, v in os.environ.items() if k != SPAWNED}
            env.update(
                RANK=str(rank),
                WORLD_SIZE="2",
                LOCAL_RANK="0",
                LOCAL_WORLD_SIZE="1",
                GROUP_RANK=str(rank),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join(paths),
            )
            log = tmp_path / f"rank{rank}.{command}.{len(list(tmp_path.glob(f'rank{rank}.*.log')))}.log"
            logs.append(log)
            with open(log, "w") as err:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "bergson", command, RUN, *args],
                        cwd=cwd,
                        env=env,
                        stdout=subprocess.DEVNULL,
                        stderr=err,
                    )
                )
        deadline = time.monotonic() + TIMEOUT
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if check and any(p.poll() not in (None, 0) for p in procs):
                break  # one failed: the other would wait for it until its timeout
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    texts = [log.read_text() for log in logs]
    if check and any(p.returncode != 0 for p in procs):
        shown = "\n".join(
            f"--- rank {r} (exit {p.returncode}):\n{t}" for r, (p, t) in enumerate(zip(procs, texts))
        )
        raise AssertionError(f"bergson {command} on two machines failed\n{shown}")
    return texts


def shards(root: Path) -> list[str]:
    return sorted(p.name.removesuffix(".npy") for p in (root / "shards").glob("*.npy"))


def share(log: str) -> int:
    """How many shards a rank computed, from its log."""
    (n,) = re.findall(r"rank \d of 2: (\d+) of \d+ shards", log)
    return int(n)


def test_build_without_a_shared_filesystem_equals_one_process_and_resumes(
    tmp_path, model_dir, corpus_file, reference
):
    args = options(model_dir, corpus_file)
    log0, log1 = two_machines(tmp_path, "build", args)
    node0, node1 = tmp_path / "node0" / RUN, tmp_path / "node1" / RUN
    both = f"--- rank 0:\n{log0}\n--- rank 1:\n{log1}"

    store = load_gradients(node0)
    assert_same_store(reference, store)
    assert store.manifest.producer["world_size"] == 2
    assert not (node0 / LAUNCH_MARKER).exists()
    # rank 1 wrote its share into a node-local copy, which stays (in progress) where it was
    assert "writes its shards node-locally" in log1 and "may be deleted" in log1, both
    assert read_manifest(node1).status == "in_progress"
    local = shards(node1)
    assert len(local) == share(log1) >= 2 and share(log0) + share(log1) == 5, both
    assert f"receiving {len(local)} shard(s) from node-local ranks" in log0, both
    for name in local:  # sent in many small chunks (SMALL_CHUNKS), byte for byte
        for f in (node1 / "shards").glob(f"{name}.*"):
            assert (node0 / "shards" / f.name).read_bytes() == f.read_bytes(), f.name

    # an interrupted run: rank 0's store not finalized, one of rank 1's shards lost everywhere,
    # another only on rank 0's machine
    gone, kept = local[:2]
    manifest = json.loads((node0 / "manifest.json").read_text())
    (node0 / "manifest.json").write_text(json.dumps({**manifest, "status": "in_progress", "shards": []}))
    for root, name in ((node0, gone), (node1, gone), (node0, kept)):
        for f in (root / "shards").glob(f"{name}.*"):
            f.unlink()
    log0, log1 = two_machines(tmp_path, "build", args)
    both = f"--- rank 0:\n{log0}\n--- rank 1:\n{log1}"
    assert "4 of 5 shards already complete; resuming" in log0, both
    assert "1 complete shard(s) are only in node-local copies" in log0, both
    assert share(log0) + share(log1) == 1, both  # only the shard missing everywhere
    assert "receiving" in log0
    assert_same_store(reference, load_gradients(node0))

    # rank 0's store is complete: nothing to do, and nothing sent
    log0, log1 = two_machines(tmp_path, "build", args)
    assert "already complete; nothing to do" in log0 and "receiving" not in log0


def test_score_without_a_shared_filesystem_equals_one_process(tmp_path, model_dir, corpus_file):
    qdata = DataConfig(dataset=str(corpus_file), split="train[3:6]", truncation=True)
    query = build(make_cfg(tmp_path, model_dir, corpus_file, name="query", save_dtype="float32", data=qdata))
    base = one_cfg(tmp_path, model_dir, corpus_file, "one")
    one = score(ScoreConfig(**{**vars(base), "query_path": str(query.root)}))
    _, log1 = two_machines(
        tmp_path, "score", options(model_dir, corpus_file, "--query_path", str(query.root))
    )
    assert "writes its shards node-locally" in log1, log1
    two = load_gradients(tmp_path / "node0" / RUN)
    assert two.manifest.kind == "scores" and np.asarray(two["scores"]).shape == (24, 3)
    assert_same_store(one, two)
    assert read_manifest(tmp_path / "node1" / RUN).status == "in_progress"


def test_preconditioner_without_a_shared_filesystem_equals_one_process(tmp_path, model_dir, corpus_file):
    """Statistics need no store: every rank sums its shards' second moments, rank 0 saves the fit,
    and a rerun finds it complete on rank 0 alone and skips the pass on every rank."""
    from bergson.config import PreconditionerConfig, options_of
    from bergson.preconditioning import fit_preconditioner
    from bergson.transforms.preconditioners import load_preconditioner

    one = fit_preconditioner(
        options_of(PreconditionerConfig, one_cfg(tmp_path, model_dir, corpus_file, "one"))
    )
    two_machines(tmp_path, "preconditioner", without(options(model_dir, corpus_file), "--save_dtype"))
    two = load_preconditioner(tmp_path / "node0" / RUN)
    assert two.num_rows == one.num_rows == 24 and two.modules == one.modules
    for name in one.modules:
        a, b = one.second_moments[name].numpy(), two.second_moments[name].numpy()
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())
    assert not (tmp_path / "node1" / RUN).exists()
    log0, log1 = two_machines(
        tmp_path, "preconditioner", without(options(model_dir, corpus_file), "--save_dtype")
    )
    for log in (log0, log1):
        assert "already complete; nothing to do" in log and "rank 1 of 2: " not in log, log


def test_a_foreign_directory_on_the_other_machine_stops_both_ranks(tmp_path, model_dir, corpus_file):
    foreign = tmp_path / "node1" / RUN
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("not a store")
    log0, log1 = two_machines(tmp_path, "build", options(model_dir, corpus_file), check=False)
    assert f"its own copy: {foreign.resolve()}" in log1 and "is not a bergson store" in log1, log1
    assert "rank 1 could not open the store" in log0, log0
    assert (foreign / "notes.txt").read_text() == "not a store"
    assert not (foreign / "manifest.json").exists()


@pytest.mark.parametrize("command", ["ekfac", "trackstar"])
def test_commands_that_read_rank_zeros_files_need_a_shared_filesystem(
    tmp_path, model_dir, corpus_file, command
):
    query = ["--query.dataset", str(corpus_file), "--query.split", "train[0:2]", "--query.truncation"]
    args = options(model_dir, corpus_file)
    if command == "ekfac":  # it writes no gradient store, so it has no store options
        args = without(args, "--save_dtype", "--shard_size")
    log0, log1 = two_machines(tmp_path, command, [*args, *query], check=False)
    for log in (log0, log1):
        assert f"bergson {command} needs a shared filesystem for its run_path: rank(s) 1" in log, log


def test_node_local_copies_are_made_once_and_finalize_names_the_missing_shards(tmp_path):
    """In one process: workers of one machine prepare the same copy at once (a lock, and temporary
    names of their own), a copy with other options is refused, and a store that lacks shards
    names them."""
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import replace

    from bergson import BergsonError
    from bergson.store import StoreWriter
    from tests.helpers.stores import synthetic_store

    made = synthetic_store(tmp_path / "made", np.arange(12.0).reshape(6, 2), shard_size=2)
    manifest = replace(made.manifest, status="in_progress", shards=[])
    copy = tmp_path / "machine1" / "runs" / "index"
    with ThreadPoolExecutor(8) as pool:
        writers = list(pool.map(lambda _: StoreWriter(copy, manifest, node_local=True), range(8)))
    assert all(w.node_local and not w.complete for w in writers)
    assert sorted(p.name for p in copy.iterdir()) == ["manifest.json", "shards"]
    assert read_manifest(copy).identity() == manifest.identity()
    other = replace(manifest, dtype="float32")
    with pytest.raises(BergsonError, match="already holds a store built with other options"):
        StoreWriter(copy, other, node_local=True)
    # --overwrite resumes an unfinished copy of the same store (it may be rank 0's own directory,
    # seen through a stale cache) and replaces one with other options
    (copy / "config.yaml").write_text("rank 0's\n")
    assert not StoreWriter(copy, manifest, node_local=True, overwrite=True).complete
    assert (copy / "config.yaml").is_file()
    StoreWriter(copy, other, node_local=True, overwrite=True)
    assert not (copy / "config.yaml").exists() and read_manifest(copy).dtype == "float32"
    StoreWriter(copy, manifest, node_local=True, overwrite=True)

    writer = writers[0]
    writer.begin_shard(1, range(2, 4))
    writer.write(np.arange(2, 4), np.ones((2, 2)), np.ones(2, np.int64), np.zeros(2, np.float32))
    writer.end_shard(1)
    assert [writer.done(i) for i in range(3)] == [False, True, False]
    with pytest.raises(
        BergsonError, match=r"2 of 3 shards are missing \(shards/00000, shards/00002\); rerunning"
    ):
        writer.finalize(3)
