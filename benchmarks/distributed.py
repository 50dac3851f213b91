"""Wall time of the same work on one process and on two workers (gloo, CPU): ``build`` plain,
``build --fsdp``, ``build`` on two "machines" without a shared filesystem (two ranks launched
by hand, each in a directory of its own, writing the same relative run_path: rank 1 writes a
node-local copy and sends its shards to rank 0 at the end), and ``magic`` data parallel; and
whether the outputs agree.

Each run is its own ``bergson`` process, timed from outside (start-up and model loading
included). On a CPU machine two workers share the cores one process would use (each worker
gets cores / workers threads), so the ratio shows the cost of splitting the work (balancing,
collectives, FSDP's weight gathers and idle steps), not a speed-up; on GPUs each worker has its
own device. Prints one JSON object.

    python -m benchmarks.distributed [--num_docs 200] [--shape 14m]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from bergson import load_gradients
from bergson.distributed import free_port

from .common import corpus_slice, pythia_shaped_dir


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bergson", *args], check=True, capture_output=True, text=True)
    return round(time.perf_counter() - start, 2)


def timed_two_machines(root: Path, args: list[str]) -> float:
    """``bergson ARGS`` as ranks 0 and 1 of one launch, run in ``root/node0`` and ``root/node1``."""
    env = {**os.environ, "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    start = time.perf_counter()
    procs = []
    for rank in (0, 1):
        (root / f"node{rank}").mkdir()
        rank_env = {**env, "RANK": str(rank), "GROUP_RANK": str(rank)}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "bergson", *args],
                cwd=root / f"node{rank}",
                env=rank_env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    if any(p.wait() != 0 for p in procs):
        raise SystemExit(f"bergson {' '.join(args)} on two machines failed")
    return round(time.perf_counter() - start, 2)


def max_rel_diff(a: Path, b: Path, column: str | None = None) -> float:
    x, y = load_gradients(a), load_gradients(b)
    u = np.asarray(x[column] if column else x.all, np.float64)
    v = np.asarray(y[column] if column else y.all, np.float64)
    return float(np.abs(u - v).max() / np.abs(u).max())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num_docs", type=int, default=200)
    parser.add_argument("--shape", default="14m")
    parser.add_argument("--magic_docs", type=int, default=48)
    args = parser.parse_args()
    out: dict = {"num_docs": args.num_docs, "shape": args.shape, "workers": 2}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = pythia_shaped_dir(root / "model", args.shape)
        data = corpus_slice(root / "data.jsonl", args.num_docs)
        common = ["--model", str(model), "--dataset", str(data), "--truncation", "--max_length", "256",
                  "--projection_dim", "16", "--save_dtype", "float32", "--shard_size", "16",
                  "--precision", "fp32", "--device", "cpu"]  # fmt: skip
        runs = {
            "build_1": ["build", str(root / "b1"), *common],
            "build_2": ["build", str(root / "b2"), *common, "--nproc_per_node", "2"],
            "build_2_fsdp": ["build", str(root / "b2f"), *common, "--nproc_per_node", "2", "--fsdp"],
        }
        out["seconds"] = {name: timed(cmd) for name, cmd in runs.items()}
        out["seconds"]["build_2_no_shared_fs"] = timed_two_machines(root, ["build", "runs/index", *common])
        local = root / "node0" / "runs" / "index"
        out["build_2_no_shared_fs_vs_1"] = round(
            out["seconds"]["build_2_no_shared_fs"] / out["seconds"]["build_1"], 3
        )
        out["shards_sent_to_rank_0"] = sum(
            1 for _ in (root / "node1" / "runs" / "index" / "shards").glob("*.npy")
        )
        out["build_2_vs_1"] = round(out["seconds"]["build_2"] / out["seconds"]["build_1"], 3)
        out["build_2_fsdp_vs_1"] = round(out["seconds"]["build_2_fsdp"] / out["seconds"]["build_1"], 3)
        out["max_rel_diff"] = {
            "build_2": max_rel_diff(root / "b1", root / "b2"),
            "build_2_fsdp": max_rel_diff(root / "b1", root / "b2f"),
            "build_2_no_shared_fs": max_rel_diff(root / "b1", local),
        }
        recipe = {
            "model": str(model),
            "precision": "fp32",
            "data": {"dataset": str(data), "split": f"train[:{args.magic_docs}]", "truncation": True,
                     "max_length": 64},
            "query": {"dataset": str(data), "split": f"train[{args.magic_docs}:{args.magic_docs + 4}]",
                      "truncation": True, "max_length": 64},
            "training": {"lr": 1e-3, "batch_size": 8, "epochs": 2},
        }  # fmt: skip
        path = root / "magic.yaml"
        path.write_text(yaml.safe_dump(recipe))
        out["seconds"]["magic_1"] = timed(["magic", str(path), "--run_path", str(root / "m1")])
        out["seconds"]["magic_2"] = timed(
            ["magic", str(path), "--run_path", str(root / "m2"), "--nproc_per_node", "2"]
        )
        out["magic_2_vs_1"] = round(out["seconds"]["magic_2"] / out["seconds"]["magic_1"], 3)
        out["max_rel_diff"]["magic_2"] = max_rel_diff(
            root / "m1" / "scores", root / "m2" / "scores", "scores"
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
