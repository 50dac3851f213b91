"""EK-FAC factor fitting and scoring: bergson next to kronfluence on the same CPU workload.

Both libraries run as separate processes on the same model, documents, queries, damping and
sampled Fisher labels (kronfluence in its own venv, see ``benchmarks/peers/kronfluence_ekfac.py``;
bergson as ``python -m bergson ekfac``). Each process's wall time and the peak RSS of its
process tree are measured from outside; the per-phase times come from each tool's own
records (bergson's ``timings.json``, kronfluence's ``result.json``). With ``--rounds`` > 1
the order alternates (kronfluence first in odd rounds) so that load on a shared machine hits
both alike, and the fastest round of each tool is reported. Prints one JSON object:

* ``fitting_ratio``: bergson (covariances + eigendecomposition + eigenvalue correction) over
  kronfluence's factor fitting (the same three phases);
* ``scoring_ratio``: bergson (query gradients and their inverse-Fisher products + the scoring
  pass) over kronfluence's pairwise scoring;
* ``peak_rss_ratio`` and the agreement of the two score matrices (Pearson, Spearman).

    python -m benchmarks.ekfac [--workload small|medium|benchmark] [--rounds 1]

``benchmark`` is the Pythia-14m-shaped model with 1,000 training documents and 20 queries
(about 40 minutes for both tools on 2 cores); ``medium`` is the same model and queries with
200 training documents (a few minutes); ``small`` takes seconds. Both tools track every linear
layer, the output head included (kronfluence tracks every ``nn.Linear``; bergson is given
``--include_output_head``), so that the workloads are alike.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .peers import kronfluence_ekfac as kf
from .peers.published_bergson import clean_env, log, run_measured

REPO = Path(__file__).resolve().parents[1]
DAMPING = 0.001  # absolute: kronfluence 1.0.1 adds damping_factor to every eigenvalue


def bergson_command(workload: dict[str, Any], out: Path) -> list[str]:
    return [
        sys.executable, "-m", "bergson", "ekfac", str(out), "--model", workload["model"],
        "--dataset", workload["train"], "--truncation", "--max_length", "128", "--token_batch_size", "2048",
        "--query.dataset", workload["queries"], "--query.truncation", "--query.max_length", "128",
        "--damping", str(DAMPING), "--damping_mode", "absolute", "--top_k", "0", "--overwrite",
        "--include_output_head",
    ]  # fmt: skip


def run_bergson(workload: dict[str, Any], out: Path, timeout_s: float) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    env = clean_env()
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = bergson_command(workload, out / "run")
    m = run_measured("bergson", cmd, env, REPO, out / "bergson.log", timeout_s)
    if m.rc != 0:
        raise SystemExit(f"bergson ekfac failed (rc={m.rc}); see {out / 'bergson.log'}")
    t = json.loads((out / "run" / "timings.json").read_text())
    from bergson import load_gradients

    scores = np.asarray(load_gradients(out / "run" / "scores")["scores"], np.float64).T
    return {
        "wall_s": round(m.wall_s, 1),
        "cpu_s": round(m.cpu_s, 1),
        "peak_rss_mb": round(m.peak_rss_mb, 1),
        "load_avg": [round(m.load_before, 2), round(m.load_after, 2)],
        "phases_s": t,
        "fitting_s": round(t["covariances"] + t["eigen"] + t.get("corrected", 0.0), 1),
        "scoring_s": round(t["queries"] + t["scores"], 1),
        "scores": scores,
    }


def run_kronfluence(workload: dict[str, Any], out: Path, timeout_s: float) -> dict[str, Any]:
    args = kf.run_args(
        workload["model"], workload["train"], workload["queries"], 128, DAMPING, out, timeout_s
    )
    report = kf.run(args)
    t = report["worker"]["timings_s"]
    return {
        "wall_s": report["wall_s"],
        "cpu_s": report["cpu_s"],
        "peak_rss_mb": report["peak_rss_mb"],
        "load_avg": report["machine"]["load_avg_before"][:1] + report["machine"]["load_avg_after"][:1],
        "phases_s": t,
        "fitting_s": round(t["factors_total_s"], 1),
        "scoring_s": round(t["scores_s"], 1),
        "scores": np.load(out / "scores.npy").astype(np.float64),
        "version": report["peer"],
    }


def agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    def rank(x: np.ndarray) -> np.ndarray:
        return np.argsort(np.argsort(x.ravel())).astype(np.float64)

    return {
        "pearson": round(float(np.corrcoef(a.ravel(), b.ravel())[0, 1]), 5),
        "spearman": round(float(np.corrcoef(rank(a), rank(b))[0, 1]), 5),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--workload", choices=["small", "medium", "benchmark"], default="small")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=kf.WORKDIR)
    p.add_argument("--timeout_s", type=float, default=3600.0)
    args = p.parse_args()
    path = args.workdir / args.workload / "workload.json"
    if not path.is_file():  # (re)write every workload: the same model and corpus slices each time
        kf.make_workloads(args.workdir.resolve(), 1000, 20)
    workload = json.loads(path.read_text())
    best: dict[str, dict[str, Any]] = {}
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        order = ("kronfluence", "bergson") if r % 2 == 0 else ("bergson", "kronfluence")
        got: dict[str, Any] = {}
        for tool in order:
            log(f"round {r + 1}/{args.rounds}: {tool}")
            out = args.workdir / "bench" / args.workload / tool
            runner = run_kronfluence if tool == "kronfluence" else run_bergson
            got[tool] = runner(workload, out, args.timeout_s)
            if tool not in best or got[tool]["wall_s"] < best[tool]["wall_s"]:
                best[tool] = got[tool]
        rounds.append({t: {k: v for k, v in d.items() if k != "scores"} for t, d in got.items()})
    ours, peer = best["bergson"], best["kronfluence"]
    result = {
        "workload": {k: v for k, v in workload.items() if not k.startswith("command")},
        "damping": f"{DAMPING} absolute, both tools",
        "fisher": "true, labels sampled per document with the same seeds in both tools",
        "machine": {"cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M")},
        "peer": peer["version"],
        "fitting_ratio": round(ours["fitting_s"] / peer["fitting_s"], 3),
        "scoring_ratio": round(ours["scoring_s"] / peer["scoring_s"], 3),
        "wall_ratio": round(ours["wall_s"] / peer["wall_s"], 3),
        "peak_rss_ratio": round(ours["peak_rss_mb"] / peer["peak_rss_mb"], 3),
        "agreement": agreement(ours["scores"], peer["scores"]),
        "rounds": rounds,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
