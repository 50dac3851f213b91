"""Every example in examples/ runs offline on a small slice and shows what it claims to show.

Each example runs as a user would run it (a subprocess from the repository root); the checks
read its printed result and compare it with ground truth: the corpus's own labels (which
documents state a fact, which are Python documentation), real retraining (MAGIC) and the
identities a score split must satisfy (per-head and per-token shares sum to the score).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
ASSETS = ROOT / "bergson" / "assets"


def run_example(script: str, *args: str, timeout: float = 600) -> str:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # tiny models gain nothing from a second thread, and lose much on a busy machine
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def shipped_corpus() -> list[dict]:
    with gzip.open(ASSETS / "corpus.jsonl.gz", "rt") as f:
        return [json.loads(line) for line in f]


def test_quickstart_finds_documents_of_the_query_s_kind(tmp_path):
    out = run_example("quickstart.py", "--run_dir", str(tmp_path), "--num_docs", "20", "--top_k", "1")
    queries = [json.loads(line) for line in (ASSETS / "queries.jsonl").read_text().splitlines()]
    firsts = re.findall(r"^  1\. score [+-][\d.]+\s+row\s+\d+\s+\[(\w+):", out, flags=re.M)
    assert len(firsts) == len(queries), out
    # the first 20 documents hold no query's own source, but the best hit of each query comes
    # from the same collection (Bible verses or Python documentation)
    assert firsts == [q["expected_source"].split(":")[0] for q in queries], out


def test_magic_scores_predict_retraining(tmp_path):
    out = run_example(
        "magic/run.py",
        "--run_dir", str(tmp_path), "--num_docs", "16", "--epochs", "1", "--num_queries", "1",
        "--top_k", "3", "--check",
    )  # fmt: skip
    assert "most helpful" in out and "most harmful" in out and "tokens of doc" in out
    changes = {
        label: (float(m), float(p))
        for label, m, p in re.findall(
            r"without the (top|bottom)-3: loss change measured ([+-][\d.]+), predicted ([+-][\d.]+)", out
        )
    }
    assert set(changes) == {"top", "bottom"}, out
    (top_m, top_p), (bottom_m, bottom_p) = changes["top"], changes["bottom"]
    # removing the documents MAGIC ranks most helpful raises the query loss, removing the most
    # harmful ones lowers it, by about the predicted amount (measured by real retraining)
    assert top_m > 0 > bottom_m, out
    assert 0.5 < top_p / top_m < 2 and 0.5 < bottom_p / bottom_m < 2, out


def test_fact_tracing_finds_the_true_sources(tmp_path):
    out = run_example(
        "fact_tracing.py", "--run_dir", str(tmp_path), "--num_facts", "10", "--num_passages", "0",
        "--epochs", "10", "--top_k", "5", "--projection_dim", "16",
    )  # fmt: skip
    result = last_json(out)
    assert result["facts"] == 10
    # the example marks each listed document that states the fact (the corpus's own labels)
    assert out.count("  * ") >= result["source_in_top_k"]
    # random scores would put a source in the top 5 for ~26% of the facts (6 or more of 10: p < 0.02)
    assert result["source_in_top_k"] >= 6 and result["share"] > result["chance"] + 0.3, out


def test_less_selection_picks_the_target_task_and_beats_random(tmp_path):
    out = run_example(
        "less_selection.py", "--run_dir", str(tmp_path), "--num_facts", "20", "--num_passages", "10",
        "--num_eval", "16", "--fraction", "0.1", "--steps", "10",
    )  # fmt: skip
    result = last_json(out)
    # ground truth: which pool documents state a capital (the synthetic corpus's own labels)
    assert result["selected"]["target_share"] >= 2 * result["pool_target_share"], out
    assert result["selected"]["target_share"] > result["random"]["target_share"], out
    # the same fine-tune lowers the loss on unseen capital statements more on the selection
    assert result["selected"]["eval_loss"] < result["random"]["eval_loss"] < result["before"]["eval_loss"], (
        out
    )


def test_per_head_shares_add_up_to_the_score(tmp_path):
    out = run_example("per_head.py", "--run_dir", str(tmp_path), "--num_docs", "24", "--query", "4")
    result = last_json(out)
    score = result["score"]
    for key in ("head_sum", "token_sum", "query_token_sum"):
        assert result[key] == pytest.approx(score, rel=1e-3), (key, out)
    assert len(result["heads"]) == 8  # 2 layers x 4 heads
    assert result["top_head"] == max(result["heads"], key=lambda h: result["heads"][h])
    # the query is about Python's "break": its top document is Python documentation
    assert shipped_corpus()[result["row_id"]]["source"].startswith("pydoc:"), out
