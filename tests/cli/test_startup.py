"""Start-up: what a small ``bergson build`` imports before its first progress update.

Reading a local JSON-lines file no longer imports ``datasets`` (nor the pandas it pulls in);
``benchmarks/startup.py`` measures the time this saves."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers.assets import ASSETS

REMOVED = ("datasets", "pandas")
"""Heavy modules the build's start-up no longer imports."""

SCRIPT = f"""
import sys
import bergson
from bergson.cli import parse
cfg = parse("build", ["/tmp/unused", "--model", "m", "--dataset", {str(ASSETS / "corpus.jsonl.gz")!r},
                      "--split", "train[:8]", "--skip_nan_rewards", "--reward_column", "text"])
from bergson.data.load import load_rows
rows = load_rows(cfg.data).select([3, 1])
print(type(rows).__name__, len(rows), ",".join(m for m in {REMOVED!r} if m in sys.modules))
"""


def test_a_small_build_reads_its_local_file_without_datasets_or_pandas():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    kind, n, imported = [*out.stdout.strip().split(" "), ""][:3]
    assert (kind, n) == ("LocalRows", "2")
    assert imported == "", f"imported at start-up: {imported}"
