"""Memory per rank of ``bergson preconditioner --shard_preconditioners`` on 1, 2 and 4 workers.

Each fit is its own ``bergson preconditioner`` process on the shipped tiny Pythia and corpus,
with a projection wide enough that the statistics dominate (``--projection_dim 48``: 2,304
numbers per module, 9 modules with the output head, about 190 MB of float32 sums). For each
worker count it reports, from the preconditioner's JSON: the bytes of statistics each rank held
at its peak (all modules' float32 sums while collecting; afterwards its own modules' sums,
float64 second moments and eigenvectors) against the unsharded fit's, each rank's peak RSS, and
the wall time. The one-worker fit is unsharded (nothing to shard); its peak RSS comes from the
operating system's record of the process. Prints one JSON object.

    python -m benchmarks.sharded_preconditioner [--workers 1 2 4] [--projection_dim 48] [--num_docs 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "bergson" / "assets"


def fit(root: Path, workers: int, args: argparse.Namespace) -> dict:
    run = root / f"pre_{workers}"
    cmd = [
        sys.executable, "-m", "bergson", "preconditioner", str(run),
        "--model", str(ASSETS / "tiny-pythia"), "--dataset", str(ASSETS / "corpus.jsonl.gz"),
        "--split", f"train[:{args.num_docs}]", "--truncation", "--max_length", "64",
        "--projection_dim", str(args.projection_dim), "--include_output_head", "--device", "cpu",
        "--precision", "fp32", "--nproc_per_node", str(workers), "--shard_preconditioners",
    ]  # fmt: skip
    # a wrapper process per fit, so that its children's peak RSS is this fit's alone
    wrapper = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "sys.stderr.write(r.stderr[-3000:]); r.check_returncode(); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)"
    )
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    meta = json.loads((run / "preconditioner.json").read_text())
    dims = {m["name"]: m["dim"] for m in meta["layout"]["modules"]}
    unsharded = 20 * sum(d * d for d in dims.values())  # every block's sums, moments, eigenvectors
    sharding = meta.get("sharding") or {
        "ranks": 1,
        "statistics_bytes_per_rank": [unsharded],
        "unsharded_statistics_bytes": unsharded,
        "peak_rss_bytes_per_rank": [int(out.stdout.split()[-1])],
    }
    per_rank = sharding["statistics_bytes_per_rank"]
    return {
        "workers": workers,
        "modules": len(dims),
        "statistics_mb_per_rank": [round(b / 2**20, 1) for b in per_rank],
        "unsharded_statistics_mb": round(sharding["unsharded_statistics_bytes"] / 2**20, 1),
        "largest_rank_share": round(max(per_rank) / sharding["unsharded_statistics_bytes"], 3),
        "peak_rss_mb_per_rank": [round(b / 2**20) for b in sharding["peak_rss_bytes_per_rank"]],
        "wall_s": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--projection_dim", type=int, default=48)
    p.add_argument("--num_docs", type=int, default=64)
    args = p.parse_args(argv)
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    with tempfile.TemporaryDirectory() as tmp:
        runs = [fit(Path(tmp), w, args) for w in args.workers]
    result = {
        "projection_dim": args.projection_dim,
        "num_docs": args.num_docs,
        "load_average": load,
        "runs": runs,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
