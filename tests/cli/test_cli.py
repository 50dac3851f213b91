"""The command line end to end, offline: through its entry point in this process (``run``, which
spares a fresh interpreter's imports), and in a subprocess (``shell``) where the exit status and
the stderr the shell sees are what a test checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from bergson import load_gradients
from tests.helpers.cli import run as shell
from tests.helpers.cli import run_in_process as run


def test_help_lists_commands():
    out = shell("--help").stdout
    assert "build" in out
    assert "--token_batch_size" in shell("build", "--help").stdout


def test_build_and_aliases(tmp_path, model_dir, corpus_file):
    a, b = tmp_path / "a", tmp_path / "b"
    common = [
        "--model",
        str(model_dir),
        "--token_batch_size",
        "256",
        "--projection_dim",
        "4",
        "--precision",
        "fp32",
    ]
    run("build", str(a), "--dataset", str(corpus_file), "--split", "train[:6]", "--truncation", *common)
    run(
        "build",
        str(b),
        "--data.dataset",
        str(corpus_file),
        "--data.split",
        "train[:6]",
        "--data.truncation",
        *common,
    )
    ga, gb = load_gradients(a), load_gradients(b)
    assert len(ga) == 6
    np.testing.assert_array_equal(np.asarray(ga.all), np.asarray(gb.all))
    assert (a / "config.yaml").read_text() == (b / "config.yaml").read_text().replace(str(b), str(a))


def test_yaml_config(tmp_path, model_dir, corpus_file):
    cfg = tmp_path / "build.yaml"
    cfg.write_text(
        f"model: {model_dir}\nprojection_dim: 2\ntoken_batch_size: 256\n"
        f"data:\n  dataset: {corpus_file}\n  split: 'train[:4]'\n  truncation: true\n"
    )
    out = tmp_path / "y"
    run("build", str(out), "--config", str(cfg), "--projection_dim", "3")
    store = load_gradients(out)
    assert len(store) == 4 and store.manifest.projection["dim"] == 3  # the flag overrides the file


def test_errors_have_no_traceback(tmp_path, model_dir, corpus_file):
    base = ("build", str(tmp_path / "x"), "--model", str(model_dir), "--dataset")
    cases = [
        (shell, (*base, str(tmp_path / "missing.jsonl"))),
        (run, (*base, str(corpus_file), "--prompt_column", "nope")),
        (run, (*base, str(corpus_file), "--token_batch_size", "8")),
        (run, (*base, str(corpus_file), "--no_such_option", "1")),
        (shell, ("frobnicate",)),
    ]  # in a subprocess: a failure of loading and an unknown command, as the shell sees them
    for how, args in cases:
        proc = how(*args, check=False)
        assert proc.returncode != 0, args
        assert "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip(), args
    bad = tmp_path / "bad.yaml"
    bad.write_text("projection_dimm: 3\n")
    proc = shell("build", str(tmp_path / "x"), "--config", str(bad), check=False)
    assert proc.returncode == 1 and "projection_dimm" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()


def test_readme_example_runs(tmp_path):
    """The README's first command, on a small slice of the shipped corpus."""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [
            sys.executable,
            str(root / "examples" / "quickstart.py"),
            "--run_dir",
            str(tmp_path),
            "--num_docs",
            "40",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "score" in proc.stdout.lower()


def test_reduce_score_query_chain(tmp_path, model_dir, corpus_file):
    """The query-side commands from the shell: reduce -> score --index -> query --search faiss."""
    common = ["--model", str(model_dir), "--truncation", "--token_batch_size", "256", "--projection_dim", "4"]
    run("build", str(tmp_path / "idx"), "--dataset", str(corpus_file), *common)
    run(
        "reduce",
        str(tmp_path / "q"),
        "--dataset",
        str(corpus_file),
        "--split",
        "train[:3]",
        "--unit_normalize",
        *common,
    )
    out = run(
        "score",
        str(tmp_path / "s"),
        "--index",
        str(tmp_path / "idx"),
        "--query_path",
        str(tmp_path / "q"),
        "--top_k",
        "2",
    )
    assert "column 0:" in out.stdout and "lowers the query's loss" in out.stdout
    assert load_gradients(tmp_path / "s")["scores"].shape == (24, 1)
    hits = tmp_path / "hits.jsonl"
    run(
        "query",
        "--index",
        str(tmp_path / "idx"),
        "--query",
        "The LORD is my shepherd",
        "--top_k",
        "2",
        "--search",
        "faiss",
        "--faiss.index_factory",
        "Flat",
        "--output",
        str(hits),
    )
    assert len(hits.read_text().splitlines()) == 2
    assert (tmp_path / "idx" / "faiss").is_dir()


def test_debug_shows_tracebacks_and_debug_logs(tmp_path, model_dir, corpus_file):
    """--debug (the original's flag): a refused option still exits 1 with its message, now with the
    traceback; without it, no traceback."""
    args = ("build", str(tmp_path / "x"), "--model", str(model_dir), "--dataset", str(corpus_file))
    bad = (*args, "--token_batch_size", "1")
    plain, debug = run(*bad, check=False), run(*bad, "--debug", check=False)
    assert plain.returncode == debug.returncode == 1
    assert "--token_batch_size 1" in plain.stderr and "Traceback" not in plain.stderr
    assert "--token_batch_size 1" in debug.stderr and "Traceback" in debug.stderr
    # a switch does not swallow the positional after it
    proc = run("build", "--debug", str(tmp_path / "y"), "--model", str(model_dir), "--dataset", str(corpus_file),
               "--token_batch_size", "1", check=False)  # fmt: skip
    assert proc.returncode == 1 and "--token_batch_size 1" in proc.stderr


def test_query_record_appends_top_and_bottom_hits(tmp_path, report_stores, query_hits):
    """--record (the original's CSV): each query appends its top and bottom hits, the same rows and
    scores `bergson query` finds, and a header once."""
    import csv

    from bergson.cli import main

    store = report_stores["store"]
    text, hits = query_hits  # 5 proponents, then 3 opponents, of `text`
    common = report_stores["common"]
    record = tmp_path / "rec" / "hits.csv"
    args = ["query", "--index", str(store.root), "--query", text, "--top_k", "3", "--record", str(record)]
    args += ["--model", common["model"], "--precision", "fp32", "--device", "cpu"]
    main(args)
    main(args)
    rows = list(csv.DictReader(record.open()))
    assert list(rows[0]) == ["query", "direction", "result", "result_index", "score"]
    assert len(rows) == 12 and [r["direction"] for r in rows[:6]] == ["Top"] * 3 + ["Bottom"] * 3
    top = [(h["row_id"], h["score"]) for h in hits[:3]]
    bottom = [(h["row_id"], h["score"]) for h in hits[5:]]
    got = [(int(r["result_index"]), float(r["score"])) for r in rows[:6]]
    assert [g[0] for g in got] == [h[0] for h in top + bottom]
    np.testing.assert_allclose([g[1] for g in got], [h[1] for h in top + bottom], rtol=1e-5)
    assert rows[0]["query"] == text and rows[0]["result"] == report_stores["texts"][top[0][0]]
    assert rows[6:] == rows[:6]


PROGRAM = """
import atexit, pathlib, sys, threading, time
atexit.register(lambda: print("exit handler ran"))
if len(sys.argv) > 2:  # a non-daemon thread still working when the command ends
    out = pathlib.Path(sys.argv[2])
    threading.Thread(target=lambda: (time.sleep(0.5), out.write_text("done"))).start()
sys.argv = ["bergson", sys.argv[1]]
from bergson.cli import entry
entry()
"""


def test_the_program_exits_fast_but_as_an_exit_should(tmp_path):
    """``bergson`` skips the interpreter's module teardown: its output (buffered in a pipe) and the
    exit handlers still come out, the exit status is the command's, and a thread still working
    is waited for."""

    def program(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", PROGRAM, *args], capture_output=True, text=True, timeout=120
        )

    ok = program("--version")
    assert ok.returncode == 0 and ok.stdout.splitlines() == [ok.stdout.splitlines()[0], "exit handler ran"]
    assert ok.stdout.startswith("bergson ")
    bad = program("frobnicate")
    assert bad.returncode == 2 and "unknown command" in bad.stderr and "exit handler ran" in bad.stdout
    waited = program("--version", str(tmp_path / "thread.txt"))
    assert waited.returncode == 0 and (tmp_path / "thread.txt").read_text() == "done"
    # a profiler writes its results after the program: the exit waits for it
    prof = tmp_path / "version.prof"
    cmd = [sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "bergson", "--version"]
    assert subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0 and prof.stat().st_size > 0
