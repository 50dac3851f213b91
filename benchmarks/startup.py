"""Start-up time: ``import bergson``, and command start to the first progress update of a small
``bergson build``, each in fresh subprocesses; plus where the import time goes.

Legs, alternated (import, build, build under ``-X importtime``, import, build, ...), best of
``--repeats`` reported (the machine may be shared: the 1-minute load average is printed at the
start and at the end):

- ``python -c "import bergson"``: wall seconds;
- ``python -m bergson build RUN --model bergson/assets/tiny-pythia --dataset
  bergson/assets/corpus.jsonl.gz --split train[:N]``: seconds from starting the process to the
  first progress line of the gradient pass on its stderr (tqdm's ``gradients:`` bar), and the
  CPU seconds (user + system) the process had used by then. The process is stopped at that
  point: what comes after is the build itself, which ``benchmarks.build`` measures;
- the libraries' floor: a process that loads the same model with transformers
  (``AutoModelForCausalLM.from_pretrained``, after ``import torch``) and exits without the
  interpreter's teardown, as the ``bergson`` program does. Every tool that attributes with
  this model pays it; ``above_floor_s`` is what the build adds before its first progress line;
- the same build under ``python -X importtime``: the modules imported before the first progress
  update, as the ``--top`` modules by cumulative import time, the ``--top`` outermost imports
  (those no other module of ours or theirs imported first), and the self time summed per
  top-level package (torch, transformers, datasets, pandas, scipy, sympy, ...). Import times
  under ``-X importtime`` are inflated by the measuring; read them as shares.

Prints one JSON object.

    python -m benchmarks.startup [--repeats 3] [--num_docs 32] [--top 25] [--root CHECKOUT] [--python PY]

``--python`` times under another interpreter. The development environment holds packages a
plain ``pip install bergson`` does not (scipy, which transformers then imports while loading a
model, costs about 0.2 s); an environment with the runtime dependencies only is what users start
from:

    python3 -m venv benchmarks/.venvs/runtime
    benchmarks/.venvs/runtime/bin/pip install torch==2.13.0 && benchmarks/.venvs/runtime/bin/pip install -e .
    python -m benchmarks.startup --python benchmarks/.venvs/runtime/bin/python

``--root`` times another checkout's bergson (the same shipped assets are used), to compare
before and after a change.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
ASSETS = ROOT / "bergson" / "assets"
PROGRESS = re.compile(rb"gradients:\s+\d+%")
IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")
HEAVY = ("datasets", "pandas", "scipy", "sympy", "sklearn", "matplotlib", "torch._dynamo")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def time_import() -> float:
    start = time.perf_counter()
    subprocess.run([PYTHON, "-c", "import bergson"], check=True, env=_env())
    return time.perf_counter() - start


FLOOR = """
import os, torch
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained({model!r})
os._exit(0)
"""


def time_floor() -> float:
    """Seconds to load the shipped example model with transformers alone (see the docstring)."""
    start = time.perf_counter()
    code = FLOOR.format(model=str(ASSETS / "tiny-pythia"))
    subprocess.run([PYTHON, "-c", code], check=True, env=_env(), stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def time_to_progress(work: Path, num_docs: int, importtime: bool) -> dict:
    """Start a small build; return the seconds and CPU seconds to its first progress line (and,
    under ``-X importtime``, the import lines written before it)."""
    run = tempfile.mkdtemp(dir=work, prefix="run")
    cmd = [PYTHON, *(["-X", "importtime"] if importtime else []), "-m", "bergson", "build"]
    cmd += [
        f"{run}/index",
        "--model",
        str(ASSETS / "tiny-pythia"),
        "--dataset",
        str(ASSETS / "corpus.jsonl.gz"),
    ]
    cmd += ["--split", f"train[:{num_docs}]", "--device", "cpu"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=_env(), cwd=work)
    seen = bytearray()
    found = threading.Event()
    at: list[float] = []

    def read() -> None:
        assert proc.stderr is not None
        while chunk := os.read(proc.stderr.fileno(), 1 << 16):
            seen.extend(chunk)
            if not at and PROGRESS.search(seen[-(len(chunk) + 64) :]):
                at.append(time.perf_counter() - start)
                found.set()
        found.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    found.wait(timeout=600)
    proc.kill()  # the rest is the build itself
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = status
    reader.join(timeout=10)
    text = seen.decode(errors="replace")
    if not at:
        raise SystemExit(f"no progress line from {' '.join(cmd)}:\n{text[-3000:]}")
    cut = PROGRESS.search(seen)
    before = seen[: cut.start() if cut else len(seen)].decode(errors="replace")
    return {
        "seconds": at[0],
        "cpu_seconds": usage.ru_utime + usage.ru_stime,  # up to the kill, a few ms after the line
        "imports": [m.groups() for m in map(IMPORT_LINE.match, before.splitlines()) if m],
    }


def summarize(imports: list[tuple[str, str, str, str]], top: int) -> dict:
    rows = [(int(s), int(c), len(indent), name) for s, c, indent, name in imports]
    outer = min((d for *_, d, _ in rows), default=1)
    by_package: dict[str, int] = {}
    for s, _, _, name in rows:
        by_package[name.split(".")[0]] = by_package.get(name.split(".")[0], 0) + s
    heavy = {h: any(name == h or name.startswith(h + ".") for *_, name in rows) for h in HEAVY}
    ms = lambda us: round(us / 1000, 1)  # noqa: E731
    ranked = sorted(rows, key=lambda r: -r[1])
    outermost = [r for r in ranked if r[2] == outer]
    return {
        "modules_imported": len(rows),
        "total_import_ms": ms(sum(s for s, *_ in rows)),
        "top_cumulative_ms": {n: ms(c) for _, c, _, n in ranked[:top]},
        "top_outermost_ms": {n: ms(c) for _, c, _, n in outermost[:top]},
        "self_ms_by_package": dict(
            sorted(((k, ms(v)) for k, v in by_package.items() if v >= 5000), key=lambda kv: -kv[1])[:top]
        ),
        "heavy_modules_imported": heavy,
    }


def main() -> None:
    global ROOT, PYTHON
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num_docs", type=int, default=32)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--root", default=str(ROOT), help="the checkout whose bergson to time")
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="the interpreter to time with, e.g. a virtual environment holding only bergson's runtime "
        "dependencies (see the module docstring)",
    )
    args = parser.parse_args()
    ROOT = Path(args.root).resolve()
    PYTHON = os.path.abspath(args.python)  # not resolved: a venv's python is a link to the base one
    load_start = os.getloadavg()[0]
    imports, builds, cpu, traced, floors = [], [], [], [], []
    with tempfile.TemporaryDirectory(prefix="bergson-startup-") as tmp:
        for _ in range(args.repeats):
            imports.append(time_import())
            floors.append(time_floor())
            leg = time_to_progress(Path(tmp), args.num_docs, importtime=False)
            builds.append(leg["seconds"])
            cpu.append(leg["cpu_seconds"])
            traced.append(time_to_progress(Path(tmp), args.num_docs, importtime=True))
    best = min(traced, key=lambda t: t["seconds"])
    print(
        json.dumps(
            {
                "benchmark": "startup",
                "root": str(ROOT),
                "python": sys.version.split()[0],
                "interpreter": PYTHON,
                "num_docs": args.num_docs,
                "import_bergson_s": round(min(imports), 3),
                "build_to_first_progress_s": round(min(builds), 3),
                "build_to_first_progress_cpu_s": round(min(cpu), 3),
                "libraries_floor_s": round(min(floors), 3),
                "above_floor_s": round(min(builds) - min(floors), 3),
                "import_bergson_times_s": [round(t, 3) for t in imports],
                "build_to_first_progress_times_s": [round(t, 3) for t in builds],
                "build_cpu_times_s": [round(t, 3) for t in cpu],
                "libraries_floor_times_s": [round(t, 3) for t in floors],
                "importtime_build_to_first_progress_s": round(best["seconds"], 3),
                "importtime": summarize(best["imports"], args.top),
                "load_average_1min": [round(load_start, 2), round(os.getloadavg()[0], 2)],
                "cpus": os.cpu_count(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
