"""The original bergson package's README commands, typed verbatim against local stand-ins; prints
one JSON line per case (exit status, seconds, the last line it printed) and a summary.

    python scripts/original_readme.py [WORKDIR]

The stand-ins (``tests/helpers/standins.py``) are tiny models and corpora named like the hub ids
the README uses; ``tests/compat/test_original_readme.py`` asserts each case's result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers.original_readme import CLI_CASES, QUERY_ROW, make_workdir, texts_of  # noqa: E402


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("Loading weights", "Writing model", "gradients:"))]
    return lines[-1][:160] if lines else ""


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="original_readme_"))
    make_workdir(root, REPO)
    texts = texts_of(root)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    worked = 0
    for case in CLI_CASES:
        argv = list(case.argv)
        argv = (
            [sys.executable, "-m", "bergson", *argv[1:]]
            if argv[0] == "bergson"
            else [sys.executable, *argv[1:]]
        )
        start = time.perf_counter()
        proc = subprocess.run(
            argv,
            cwd=root,
            env=env,
            input=case.stdin.replace("QUERY", texts[QUERY_ROW]) if case.stdin else "",
            capture_output=True,
            text=True,
        )
        worked += proc.returncode == 0
        printed = (
            _last_line(proc.stderr) if proc.returncode else _last_line(proc.stdout) or _last_line(proc.stderr)
        )
        if case.stdin:  # the interactive query: its first hit
            hits = [ln.strip() for ln in proc.stdout.splitlines() if ln.strip().startswith("1.")]
            printed = hits[0][:160] if hits else printed
        record = {
            "case": case.name,
            "command": " ".join(case.argv),
            "exit": proc.returncode,
            "seconds": round(time.perf_counter() - start, 1),
            "printed": printed,
        }
        print(json.dumps(record), flush=True)
    print(json.dumps({"cases": len(CLI_CASES), "exit_0": worked, "workdir": str(root)}))


if __name__ == "__main__":
    main()
