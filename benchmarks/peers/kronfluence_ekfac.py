"""kronfluence's EK-FAC influence scores as a peer for bergson's EK-FAC.

kronfluence (PyPI, pinned to ``KRONFLUENCE_VERSION``) lives in its own virtual environment,
created on first use under ``benchmarks/.venvs/kronfluence`` (kept out of git):

    python -m venv benchmarks/.venvs/kronfluence
    pip install torch==2.13.0                                  # the CPU build
    pip install torch==2.13.0 accelerate>=0.31.0 einops>=0.8.0 einconv>=0.1.0 opt-einsum>=3.3.0 \\
        safetensors>=0.4.2 tqdm>=4.66.4 numpy psutil transformers==<dev venv's> tokenizers==<dev venv's>
    pip install --no-deps kronfluence==1.0.1

``--no-deps`` because kronfluence 1.0.1 declares ``torchvision>=0.16`` but never imports it, and
a torchvision wheel from PyPI is built against another torch (pulling a CUDA torch, or breaking
``import transformers`` on CPU); every other declared requirement is installed as above.
transformers and tokenizers are pinned to the dev venv's versions so that both libraries run
the same model code and tokenizer.

The work itself runs in ``_kronfluence_worker.py`` (its docstring lists the conventions),
started with the venv's Python (``-I``, cwd = the output directory, hub and datasets offline).
This script measures the worker's wall time, CPU time and the peak RSS of its process tree
(psutil polled every 50 ms, ru_maxrss as a floor) and prints one JSON object: those numbers,
the worker's ``result.json`` (per-phase timings and settings) and how the venv was made.

    python -m benchmarks.peers.kronfluence_ekfac --model_dir DIR --train FILE --queries FILE \\
        --max_tokens 128 --damping 0.001 --out_dir DIR [--batch_size 16] [--sampling document]
        [--fisher true] [--dtype float32] [--include_bias] [--exclude_modules lm_head] ...
    python -m benchmarks.peers.kronfluence_ekfac --make_workload [--workload_dir DIR]

``--make_workload`` saves three workloads (and prints the command for each): ``small`` (a random
GPT-NeoX of width 32 and 2 layers, 64 training documents and 8 query documents of the shipped
corpus, plus the 5 prompt/completion queries of ``bergson/assets/queries.jsonl``) and
``benchmark`` (the Pythia-14m-shaped model, 1,000 training documents, 20 query documents), and
``medium`` (the same model and number of queries, 200 training documents).
Query documents are the corpus documents right after the training ones.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata as md
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ..common import ASSETS, CORPUS, random_neox_dir
from .published_bergson import (
    INSTALL_MARKER,
    _step,
    clean_env,
    clear_interrupted_venv,
    dir_size_mb,
    log,
    log_tail,
    peer_versions,
    run_measured,
    scan_log,
)

REPO = Path(__file__).resolve().parents[2]
KRONFLUENCE_VERSION = "1.0.1"
TORCH_VERSION = "2.13.0"
VENV = REPO / "benchmarks" / ".venvs" / "kronfluence"
WORKER = Path(__file__).resolve().with_name("_kronfluence_worker.py")
WORKDIR = REPO / "runs" / "kronfluence_ekfac"
MEDIUM_DOCS = 200  # the medium workload: the benchmark's model and queries' count, 200 training documents
# kronfluence 1.0.1's requirements except torch (pinned) and torchvision (declared, never imported).
RUNTIME_DEPS = (
    "accelerate>=0.31.0",
    "einops>=0.8.0",
    "einconv>=0.1.0",
    "opt-einsum>=3.3.0",
    "safetensors>=0.4.2",
    "tqdm>=4.66.4",
)
# Passed through to the worker unchanged: (flag, kind, default, help).
WORKER_OPTIONS: tuple[tuple[str, Any, Any, str], ...] = (
    ("--batch_size", int, 16, "documents per batch for factors and training gradients"),
    ("--query_batch_size", int, 0, "0: all queries in one batch (one pass over the training set)"),
    ("--query_mode", str, "auto", "auto | text | completion (auto: completion if prompt+completion columns)"),
    ("--sampling", str, "document", "document: bergson's per-document seeds | global: torch's global RNG"),
    ("--fisher", str, "true", "true (sampled labels) | empirical (dataset labels)"),
    ("--seed", int, 0, "label-sampling seed (also torch.manual_seed)"),
    ("--dtype", str, "float32", "float32 | float64 for kronfluence's factor and score dtypes"),
    ("--exclude_modules", str, "", "comma-separated nn.Linear names not to track"),
    ("--threads", int, 0, "torch threads in the worker (0: torch's default)"),
)


def run_args(
    model_dir: str,
    train: str,
    queries: str,
    max_tokens: int,
    damping: float,
    out: Path,
    timeout_s: float,
    **worker: Any,
) -> argparse.Namespace:
    """The namespace :func:`run` takes, with the worker options at their defaults unless given."""
    options = {flag[2:]: default for flag, _, default, _ in WORKER_OPTIONS}
    options.update(worker)
    return argparse.Namespace(
        model_dir=model_dir,
        train=train,
        queries=queries,
        max_tokens=max_tokens,
        damping=str(damping),
        out_dir=str(out),
        skip_install=False,
        timeout_s=timeout_s,
        include_bias=False,
        per_module_scores=False,
        **options,
    )


WORKER_FLAGS = ("--include_bias", "--per_module_scores")


def pinned_dev_packages() -> list[str]:
    """transformers and tokenizers at this dev venv's versions (unpinned if absent)."""
    out = []
    for name in ("transformers", "tokenizers"):
        try:
            out.append(f"{name}=={md.version(name)}")
        except md.PackageNotFoundError:
            out.append(name)
    return out


PACKAGES = (
    "kronfluence",
    "torch",
    "transformers",
    "tokenizers",
    "accelerate",
    "numpy",
    "safetensors",
    "opt_einsum",
    "einops",
    "einconv",
    "torchvision",
)


def ensure_venv(venv: Path = VENV, skip_install: bool = False) -> dict[str, Any]:
    """Create kronfluence's venv unless a complete one exists; describe how it was made."""
    marker = venv / INSTALL_MARKER
    python = venv / "bin" / "python"
    info: dict[str, Any]
    if python.is_file() and marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("kronfluence") != KRONFLUENCE_VERSION and not skip_install:
            log(
                f"{venv} holds kronfluence {info.get('kronfluence')}, want {KRONFLUENCE_VERSION}; recreating it"
            )
            shutil.rmtree(venv)
            return ensure_venv(venv)
        info["reused"] = True
    elif skip_install:
        raise SystemExit(f"--skip_install given but there is no complete kronfluence venv at {venv}")
    else:
        clear_interrupted_venv(venv)
        log_file = venv.parent / "kronfluence-install.log"
        log_file.write_text("")
        pip = [str(python), "-I", "-m", "pip"]
        deps = [f"torch=={TORCH_VERSION}", *RUNTIME_DEPS, "numpy", "psutil", *pinned_dev_packages()]
        steps = {
            "venv_s": _step([sys.executable, "-I", "-m", "venv", str(venv)], log_file),
            "torch_s": _step([*pip, "install", f"torch=={TORCH_VERSION}"], log_file),
            "deps_s": _step([*pip, "install", *deps], log_file),
            "kronfluence_s": _step(
                [*pip, "install", "--no-deps", f"kronfluence=={KRONFLUENCE_VERSION}"], log_file
            ),
            "check_s": _step(
                [
                    str(python),
                    "-I",
                    "-c",
                    "import kronfluence.analyzer, transformers, torch; assert torch.__version__.startswith('"
                    + TORCH_VERSION
                    + "')",
                ],
                log_file,
            ),
        }
        info = {
            "kronfluence": KRONFLUENCE_VERSION,
            "recipe": [
                f"python -m venv {venv.relative_to(REPO)}",
                f"pip install torch=={TORCH_VERSION}",
                "pip install " + " ".join(deps),
                f"pip install --no-deps kronfluence=={KRONFLUENCE_VERSION}",
            ],
            "why_no_deps": (
                "kronfluence declares torchvision>=0.16 but never imports it; PyPI's torchvision is built "
                "for another torch. All its other requirements are installed explicitly."
            ),
            "install_s": round(sum(steps.values()), 1),
            "steps": steps,
            "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "log": str(log_file),
        }
        marker.write_text(json.dumps(info, indent=2))
        info["reused"] = False
    info["path"] = str(venv)
    info["size_mb"] = round(dir_size_mb(venv), 1)
    info["versions"] = peer_versions(venv, venv, PACKAGES)
    return info


# ---------------------------------------------------------------------------------------------
# Workloads


def corpus_rows(start: int, stop: int) -> list[dict[str, Any]]:
    with gzip.open(CORPUS, "rt") as f:
        rows = [json.loads(line) for _, line in zip(range(stop), f)]
    return rows[start:stop]


def write_text_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    return path


def run_command(model: Path, train: Path, queries: Path, out: Path, extra: str = "") -> str:
    cmd = (
        f"python -m benchmarks.peers.kronfluence_ekfac --model_dir {model} --train {train} "
        f"--queries {queries} --max_tokens 128 --damping 0.001 --out_dir {out}"
    )
    return cmd + (f" {extra}" if extra else "")


def make_workloads(root: Path, bench_docs: int, bench_queries: int) -> dict[str, Any]:
    """The small check workload and the benchmark workload under ``root``."""
    from ..common import pythia14m_dir

    out: dict[str, Any] = {}
    small = root / "small"
    small.mkdir(parents=True, exist_ok=True)
    model = random_neox_dir(
        small / "model", hidden=32, layers=2, heads=4, intermediate=128, max_positions=256, seed=0
    )
    train = write_text_jsonl(small / "train.jsonl", corpus_rows(0, 64))
    queries = write_text_jsonl(small / "queries.jsonl", corpus_rows(64, 72))
    completion = small / "queries_completion.jsonl"
    completion.write_text(
        "".join(
            json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n"
            for r in map(json.loads, (ASSETS / "queries.jsonl").read_text().splitlines())
            if r.get("prompt") is not None and r.get("completion") is not None
        )
    )
    out["small"] = {
        "model": str(model),
        "model_shape": "GPT-NeoX hidden 32, 2 layers, 4 heads, intermediate 128, random (seed 0)",
        "train": str(train),
        "train_documents": 64,
        "queries": str(queries),
        "queries_note": "corpus documents 64..71 (text)",
        "queries_completion": str(completion),
        "command": run_command(model, train, queries, root / "out" / "small"),
        "command_completion": run_command(model, train, completion, root / "out" / "small-completion"),
    }
    bench = root / "benchmark"
    bench.mkdir(parents=True, exist_ok=True)
    model = pythia14m_dir(bench / "model")
    train = write_text_jsonl(bench / f"train{bench_docs}.jsonl", corpus_rows(0, bench_docs))
    queries = write_text_jsonl(
        bench / f"queries{bench_queries}.jsonl", corpus_rows(bench_docs, bench_docs + bench_queries)
    )
    out["benchmark"] = {
        "model": str(model),
        "model_shape": "Pythia-14m-shaped GPT-NeoX (hidden 128, 6 layers, 4 heads, intermediate 512), random",
        "train": str(train),
        "train_documents": bench_docs,
        "queries": str(queries),
        "queries_note": f"corpus documents {bench_docs}..{bench_docs + bench_queries - 1} (text)",
        "command": run_command(model, train, queries, root / "out" / "benchmark"),
    }
    medium = root / "medium"
    medium.mkdir(parents=True, exist_ok=True)
    train = write_text_jsonl(medium / f"train{MEDIUM_DOCS}.jsonl", corpus_rows(0, MEDIUM_DOCS))
    queries = write_text_jsonl(
        medium / f"queries{bench_queries}.jsonl", corpus_rows(MEDIUM_DOCS, MEDIUM_DOCS + bench_queries)
    )
    out["medium"] = {
        **out["benchmark"],
        "train": str(train),
        "train_documents": MEDIUM_DOCS,
        "queries": str(queries),
        "queries_note": f"corpus documents {MEDIUM_DOCS}..{MEDIUM_DOCS + bench_queries - 1} (text)",
        "command": run_command(model, train, queries, root / "out" / "medium"),
    }
    for name, w in out.items():
        (root / name / "workload.json").write_text(json.dumps(w, indent=2))
    return out


# ---------------------------------------------------------------------------------------------
# Running the worker


def worker_command(args: argparse.Namespace, python: Path) -> list[str]:
    cmd = [
        str(python),
        "-I",
        str(WORKER),
        "--model_dir",
        str(Path(args.model_dir).resolve()),
        "--train",
        str(Path(args.train).resolve()),
        "--queries",
        str(Path(args.queries).resolve()),
        "--max_tokens",
        str(args.max_tokens),
        "--damping",
        str(args.damping),
        "--out_dir",
        str(Path(args.out_dir).resolve()),
    ]
    for flag, _, _, _ in WORKER_OPTIONS:
        cmd += [flag, str(getattr(args, flag[2:]))]
    for flag in WORKER_FLAGS:
        if getattr(args, flag[2:]):
            cmd.append(flag)
    return cmd


def run(args: argparse.Namespace) -> dict[str, Any]:
    for name in ("model_dir", "train", "queries", "out_dir"):
        if getattr(args, name) is None:
            raise SystemExit(f"--{name} is required (or pass --make_workload)")
    install = ensure_venv(VENV, args.skip_install)
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cmd = worker_command(args, VENV / "bin" / "python")
    env = clean_env()
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(out / ".hf_home"),
    )
    log_path = out / "worker.log"
    log(" ".join(cmd))
    load_before = os.getloadavg()
    measured = run_measured("kronfluence", cmd, env, out, log_path, args.timeout_s)
    report: dict[str, Any] = {
        "peer": f"kronfluence {KRONFLUENCE_VERSION} EK-FAC",
        "command": cmd,
        "rc": measured.rc,
        "wall_s": round(measured.wall_s, 2),
        "cpu_s": round(measured.cpu_s, 1),
        "peak_rss_mb": round(measured.peak_rss_mb, 1),
        "peak_rss_note": "process tree, psutil every 50 ms with the kernel's ru_maxrss as a floor",
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_before": [round(x, 2) for x in load_before],
            "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "log": str(log_path),
        "log_notes": scan_log(log_path),
        "venv": install,
    }
    result = out / "result.json"
    if measured.rc != 0 or not result.is_file():
        report["log_tail"] = log_tail(log_path, 3000)
        print(json.dumps(report, indent=2))
        raise SystemExit(f"kronfluence worker failed (rc={measured.rc}); see {log_path}")
    report["worker"] = json.loads(result.read_text())
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--model_dir")
    p.add_argument("--train")
    p.add_argument("--queries")
    p.add_argument("--max_tokens", type=int, default=128)
    p.add_argument(
        "--damping", default="0.001", help="absolute damping, or 'heuristic' (0.1 x mean eigenvalue)"
    )
    p.add_argument("--out_dir")
    for flag, kind, default, help_text in WORKER_OPTIONS:
        p.add_argument(flag, type=kind, default=default, help=help_text)
    p.add_argument("--include_bias", action="store_true", help="track biases too (homogeneous coordinate)")
    p.add_argument("--per_module_scores", action="store_true", help="also save scores_per_module.npz")
    p.add_argument("--skip_install", action="store_true", help="fail instead of creating the venv")
    p.add_argument("--timeout_s", type=float, default=3600.0)
    p.add_argument("--make_workload", action="store_true", help="save the small and benchmark workloads")
    p.add_argument("--workload_dir", type=Path, default=WORKDIR)
    p.add_argument("--bench_docs", type=int, default=1000)
    p.add_argument("--bench_queries", type=int, default=20)
    args = p.parse_args()
    if args.make_workload:
        print(
            json.dumps(
                make_workloads(args.workload_dir.resolve(), args.bench_docs, args.bench_queries), indent=2
            )
        )
        return
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main()
