"""Peers side by side: ours, the published bergson, kronfluence, traker and dattri on the same
workloads in one invocation, one table.

    python -m benchmarks.peers.run [--work runs/peers] [--num_docs 64] [--digits_train 1000]
        [--digits_queries 50] [--lds_subsets 64] [--skip_lm] [--skip_digits] [--timeout_s 1800]

Every peer runs in its own virtual environment under ``benchmarks/.venvs/`` (created on first
use: ``venvs.py`` for traker and dattri, ``kronfluence_ekfac.py`` and ``published_bergson.py``
for the other two), as its own process, exchanging scores as ``.npy`` files; ours runs as a
process of this interpreter. Each row's wall time and peak RSS are those of its processes
(imports and start-up included), measured from outside (psutil every 50 ms, ru_maxrss as a
floor; a row of several commands adds their times and keeps the largest peak).

Workloads (``digits.py`` and ``lm.py`` say exactly what is computed):

* ``digits``: logistic regression on scikit-learn's digits; ``grad_dot``, ``influence`` and
  ``trak`` for ours and dattri, ``trak`` for traker. LDS: every score matrix is checked
  against ``--lds_subsets`` retrains on random halves of the training set (``metrics.lds``).
* ``lm``: the shipped tiny-pythia, corpus documents and queries; ``grad_dot`` for ours and the
  published bergson, ``ekfac`` for ours and kronfluence. No LDS: retraining a language model
  per subset is what ``bergson validate`` does, and is not repeated here.

Agreement: Spearman and Pearson over all (query, training example) pairs between a peer's
scores and ours for the same method. Prints one JSON object and writes
``benchmarks/peers/results/peers.md`` (the table, the command, the machine's load) with the
JSON beside it (``peers.json``: every row's details, worker settings and failures).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from . import digits, lm
from .metrics import Row, agreement, lds, markdown_table, random_halves
from .published_bergson import Run, clean_env, log, log_tail, run_measured

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def label(peer: str) -> str:
    """A peer's name in the table, with the pinned version of its venv recipe."""
    from .venvs import RECIPES

    return f"{peer} {RECIPES[peer].version}" if peer in RECIPES else peer


def child_env(work: Path, ours: bool) -> dict[str, str]:
    env = clean_env()
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HOME=str(work / ".hf_home"),
    )
    if ours:
        env["PYTHONPATH"] = str(REPO)  # this checkout's bergson, whatever is installed
    return env


def measure(
    name: str, cmds: list[list[str]], work: Path, ours: bool, timeout_s: float
) -> tuple[float, float, list[Run]]:
    """Run commands one after another; (total wall s, largest peak RSS MB, runs). Raises on failure."""
    runs = []
    for k, cmd in enumerate(cmds):
        log(f"{name}: {shlex.join(cmd)}")
        run = run_measured(name, cmd, child_env(work, ours), work, work / f"{name}.{k}.log", timeout_s)
        runs.append(run)
        if run.rc != 0:
            raise RuntimeError(f"exit {run.rc}; log tail: {log_tail(run.log, 600)}")
    return sum(r.wall_s for r in runs), max(r.peak_rss_mb for r in runs), runs


def attempt(rows: list[Row], row: Row, fn: Callable[[], None]) -> None:
    """Fill ``row`` with ``fn``; a failure becomes the row's reason instead of stopping the run."""
    try:
        fn()
    except (Exception, SystemExit) as e:  # kronfluence_ekfac.run exits on failure
        log(f"{row.peer} / {row.workload} / {row.method} failed: {e}")
        row.reason = f"failed: {str(e).strip()[-300:]}"
        row.details["traceback"] = traceback.format_exc()[-2000:]
    rows.append(row)


# ---------------------------------------------------------------------------------------------
# digits


def run_digits(args: argparse.Namespace, rows: list[Row], venvs: dict[str, Any]) -> dict[str, Any]:
    import torch

    from . import venvs as venv_mod

    work = (args.work / "digits").resolve()
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    data = digits.make_data(args.digits_train, args.digits_queries, args.seed)
    t = time.perf_counter()
    model = digits.train(data["x_train"], data["y_train"], args.wd)
    train_s = time.perf_counter() - t
    npz = digits.save_workload(work / "digits.npz", data, model, args.wd)
    with torch.no_grad():
        acc = float((model(torch.from_numpy(data["x_query"])).argmax(1).numpy() == data["y_query"]).mean())
    masks = random_halves(args.digits_train, args.lds_subsets, args.seed)
    t = time.perf_counter()
    losses = digits.retrain_losses(data, masks, args.wd)
    retrain_s = time.perf_counter() - t
    info = {
        "train": args.digits_train,
        "queries": args.digits_queries,
        "weight_decay": args.wd,
        "query_accuracy": round(acc, 4),
        "train_s": round(train_s, 2),
        "lds_subsets": args.lds_subsets,
        "retrain_s": round(retrain_s, 1),
    }
    ours_scores: dict[str, np.ndarray] = {}

    def score_row(row: Row, cmd: list[str], out: Path, is_ours: bool) -> None:
        out.mkdir(parents=True, exist_ok=True)
        wall, rss, _ = measure(f"{row.peer}-{row.method}", [cmd], out, is_ours, args.timeout_s)
        scores = np.load(out / "scores.npy")
        if scores.shape != (args.digits_queries, args.digits_train):
            raise RuntimeError(f"scores of shape {scores.shape}, expected [queries, train]")
        row.wall_s, row.peak_rss_mb = wall, rss
        row.lds = lds(scores, masks, losses)
        if is_ours:
            ours_scores[row.method] = scores
        elif row.method in ours_scores:
            row.agreement = agreement(ours_scores[row.method], scores)
        result = out / "result.json"
        if result.is_file():
            row.details["worker"] = json.loads(result.read_text())

    for method in digits.METHODS:
        row = Row("ours", "digits", method)
        out = work / "ours" / method
        cmd = [sys.executable, "-m", "benchmarks.peers._ours_digits", "--workload", str(npz)]
        cmd += ["--method", method, "--out_dir", str(out)]
        attempt(rows, row, lambda row=row, cmd=cmd, out=out: score_row(row, cmd, out, True))

    peer_methods = {"traker": ("trak",), "dattri": digits.METHODS}
    for peer, methods in peer_methods.items():
        if peer not in args.peers:
            continue
        try:
            venvs[peer] = venv_mod.ensure(venv_mod.RECIPES[peer])
        except (Exception, SystemExit) as e:
            for method in methods:
                rows.append(Row(label(peer), "digits", method, reason=f"venv set-up failed: {e}"))
            continue
        python = Path(venvs[peer]["path"]) / "bin" / "python"
        for method in methods:
            row = Row(label(peer), "digits", method)
            out = work / peer / method
            cmd = [str(python), "-I", str(HERE / f"_{peer}_worker.py"), "--workload", str(npz)]
            cmd += ["--out_dir", str(out)] + (["--method", method] if peer == "dattri" else [])
            attempt(rows, row, lambda row=row, cmd=cmd, out=out: score_row(row, cmd, out, False))
    for peer, why in (
        ("bergson 2.5.1 (PyPI)", "not run: its build/score CLI takes a Hugging Face model and dataset"),
        ("kronfluence 1.0.1", "not run on this workload (it has EK-FAC rows on lm)"),
    ):
        if peer.split()[0] in args.peers:
            rows.append(Row(peer, "digits", "–", reason=why))
    return info


# ---------------------------------------------------------------------------------------------
# lm


def run_lm(args: argparse.Namespace, rows: list[Row], venvs: dict[str, Any]) -> dict[str, Any]:
    from . import kronfluence_ekfac as kf
    from .published_bergson import PEER_VENV, ensure_peer_venv, load_ours, load_peer

    work = (args.work / "lm").resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = lm.make_data(work / "data", args.num_docs)
    info = {"model": str(lm.MODEL.relative_to(REPO)), "train_documents": args.num_docs, "queries": 5}
    ours_scores: dict[str, np.ndarray] = {}

    def ours_grad_dot(row: Row) -> None:
        out = work / "ours-grad_dot"
        cmds = [[*lm.ours_build(out / name, data[name]), "--overwrite"] for name in ("train", "queries")]
        row.wall_s, row.peak_rss_mb, _ = measure("ours-grad_dot", cmds, work, True, args.timeout_s)
        train, queries = load_ours(out / "train"), load_ours(out / "queries")
        ours_scores["grad_dot"], common = lm.dot_scores(train.modules, queries.modules)
        row.details["modules"] = common

    def peer_grad_dot(row: Row) -> None:
        install_log = work / "published-install.log"
        venvs["bergson-2.5.1"] = ensure_peer_venv(PEER_VENV, args.skip_install, install_log)
        out = work / "published-grad_dot"
        peer_bin = PEER_VENV / "bin" / "bergson"
        cmds = []
        for name in ("train", "queries"):
            if (out / name).exists():
                import shutil

                shutil.rmtree(out / name)  # the published build wants a fresh directory
            cmds.append(lm.peer_build(peer_bin, out / name, data[name]))
        row.wall_s, row.peak_rss_mb, _ = measure("published-grad_dot", cmds, work, False, args.timeout_s)
        env = child_env(work, False)
        train = load_peer(out / "train", PEER_VENV / "bin" / "python", env, out / "train")
        queries = load_peer(out / "queries", PEER_VENV / "bin" / "python", env, out / "queries")
        scores, common = lm.dot_scores(train.modules, queries.modules)
        row.details["modules"] = common
        if "grad_dot" in ours_scores:
            row.agreement = agreement(ours_scores["grad_dot"], scores)

    def ours_ekfac(row: Row) -> None:
        out = work / "ours-ekfac"
        row.wall_s, row.peak_rss_mb, _ = measure(
            "ours-ekfac", [lm.ours_ekfac(out, data)], work, True, args.timeout_s
        )
        ours_scores["ekfac"] = lm.ours_ekfac_scores(out)

    def kronfluence(row: Row) -> None:
        out = work / "kronfluence-ekfac"
        report = kf.run(lm.kronfluence_args(data, out, args.timeout_s))
        venvs["kronfluence"] = report["venv"]
        row.wall_s, row.peak_rss_mb = report["wall_s"], report["peak_rss_mb"]
        scores = np.load(out / "scores.npy").astype(np.float64)
        if "ekfac" in ours_scores:
            row.agreement = agreement(ours_scores["ekfac"], scores)

    plan: list[tuple[str, str, Callable[[Row], None]]] = [("ours", "grad_dot", ours_grad_dot)]
    if "bergson" in args.peers:
        plan.append(("bergson 2.5.1 (PyPI)", "grad_dot", peer_grad_dot))
    plan.append(("ours", "ekfac", ours_ekfac))
    if "kronfluence" in args.peers:
        plan.append(("kronfluence 1.0.1", "ekfac", kronfluence))
    for peer, method, fn in plan:
        row = Row(peer, "lm", method)
        attempt(rows, row, lambda row=row, fn=fn: fn(row))
    reasons = {
        "traker": (
            "trak",
            "not run: traker 0.3.2 ships model outputs for image and text classification and CLIP, "
            "none for a causal LM's per-token loss",
        ),
        "dattri": ("–", "not attempted on the LM (dattri's LM tooling is the separate dattri-llm package)"),
    }
    for peer, (method, why) in reasons.items():
        if peer in args.peers:
            rows.append(Row(label(peer), "lm", method, reason=why))
    return info


# ---------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }


def write_markdown(path: Path, rows: list[Row], report: dict[str, Any], command: str) -> None:
    before, after = report["machine_before"], report["machine_after"]
    lines = [
        "# Peers side by side",
        "",
        f"Command: `{command}`, {before['date_utc']} UTC, {before['cpus']} CPUs. Load average "
        f"{before['load_avg'][0]} at the start and {after['load_avg'][0]} at the end: the machine was shared "
        "with other jobs, so wall times carry their contention (every row alike, run one after another).",
        "",
        markdown_table(rows),
        "Wall s and peak RSS MB are of the row's own processes (interpreter start-up and imports "
        "included). Spearman / Pearson vs ours: agreement of the row's scores with ours for the same "
        "method over all (query, training example) pairs. LDS: Spearman, over retrains on random "
        "halves of the training set, between each query's negated loss and the summed scores of the "
        "half, averaged over queries.",
        "",
        "## Workloads",
        "",
    ]
    d = report["workloads"].get("digits")
    if d:
        lines.append(
            f"- `digits`: logistic regression (`Linear(64, 10)`) on scikit-learn's digits, {d['train']} "
            f"training examples, {d['queries']} held-out queries (accuracy {d['query_accuracy']}), L-BFGS to "
            f"convergence with weight decay {d['weight_decay']}; LDS over {d['lds_subsets']} retrains on "
            "random halves. Methods: `grad_dot` (loss-gradient dot products), `influence` (ours: "
            "empirical-Fisher inverse + weight decay; dattri: the exact Hessian inverse), `trak` (one "
            "model; ours unprojected, traker and dattri projected to 512)."
        )
    m = report["workloads"].get("lm")
    if m:
        lines.append(
            f"- `lm`: `{m['model']}` (GPT-NeoX, width 64, 2 layers), the first {m['train_documents']} "
            f"documents of the shipped corpus, the {m['queries']} shipped queries (full text). `grad_dot`: "
            "exact per-document gradients of the summed loss over the 8 linear layers of "
            "`gpt_neox.layers`; `ekfac`: sampled-label true Fisher, absolute damping 0.001, the same "
            "layers. No LDS: retraining the LM per subset is `bergson validate`'s job."
        )
    lines += ["", "## Peer environments", ""]
    for name, v in report["venvs"].items():
        versions = ", ".join(f"{k} {x}" for k, x in (v.get("versions") or {}).items())
        lines.append(f"- `{name}`: {versions}")
    lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


PEERS = ("bergson", "kronfluence", "traker", "dattri")
DIGITS = 1797  # scikit-learn's digits


def check_args(args: argparse.Namespace) -> None:
    """Bad options end the run before any work, with a message naming the option."""
    unknown = sorted(set(args.peers) - set(PEERS))
    if unknown:
        raise SystemExit(f"--peers: unknown {unknown}; choose from {' '.join(PEERS)}")
    if args.num_docs < 1:
        raise SystemExit("--num_docs must be at least 1")
    if args.digits_train < 4 or args.digits_queries < 1 or args.digits_train + args.digits_queries > DIGITS:
        raise SystemExit(f"--digits_train (>= 4) + --digits_queries (>= 1) must be at most {DIGITS}")
    if args.lds_subsets < 2:
        raise SystemExit("--lds_subsets must be at least 2 (LDS is a correlation over retrains)")
    if args.wd <= 0:
        raise SystemExit("--wd must be > 0 (it makes every retrain's optimum unique)")


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--work", type=Path, default=REPO / "runs" / "peers")
    p.add_argument("--num_docs", type=int, default=64, help="lm: training documents of the shipped corpus")
    p.add_argument("--digits_train", type=int, default=1000)
    p.add_argument("--digits_queries", type=int, default=50)
    p.add_argument("--lds_subsets", type=int, default=64)
    p.add_argument("--wd", type=float, default=1e-2, help="digits: L2 weight decay of training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peers", nargs="+", default=list(PEERS), help="peers to run besides ours")
    p.add_argument("--skip_lm", action="store_true")
    p.add_argument("--skip_digits", action="store_true")
    p.add_argument(
        "--skip_install", action="store_true", help="published bergson: fail instead of installing"
    )
    p.add_argument("--timeout_s", type=float, default=1800.0)
    p.add_argument("--markdown", type=Path, default=RESULTS / "peers.md")
    args = p.parse_args()
    check_args(args)
    command = shlex.join(["python", "-m", "benchmarks.peers.run", *sys.argv[1:]])
    rows: list[Row] = []
    venvs: dict[str, Any] = {}
    report: dict[str, Any] = {"command": command, "machine_before": machine(), "workloads": {}}
    if not args.skip_digits:
        report["workloads"]["digits"] = run_digits(args, rows, venvs)
    if not args.skip_lm:
        report["workloads"]["lm"] = run_lm(args, rows, venvs)
    report["machine_after"] = machine()
    report["venvs"] = {
        k: {x: v.get(x) for x in ("path", "versions", "install_s", "reused")} for k, v in venvs.items()
    }
    report["rows"] = [asdict(r) for r in rows]
    write_markdown(args.markdown, rows, report, command)
    text = json.dumps(report, indent=2, default=str)
    args.markdown.with_suffix(".json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
