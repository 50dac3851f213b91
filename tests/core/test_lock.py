"""The run-directory lock: a second writer refuses naming the holder; a stale lock is taken over;
two processes racing for one lock never both get it; a launch of several workers holds one."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bergson.cli import main
from bergson.core.lock import RunLock, lock_path, run_lock
from bergson.errors import BergsonError
from bergson.store import load_gradients

HOLD = """
import sys, time
from bergson.core.lock import RunLock
lock = RunLock(sys.argv[1], "build").acquire()
print("held", flush=True)
sys.stdin.readline()
lock.release()
"""


def hold(path: Path) -> subprocess.Popen:
    """Another process holding the lock of ``path`` until its stdin is closed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def build_args(root: Path, model_dir: Path, corpus_file: Path, *extra: str) -> list[str]:
    return ["build", str(root), "--model", str(model_dir), "--dataset", str(corpus_file), "--truncation",
            "--token_batch_size", "256", "--projection_dim", "4", "--device", "cpu", *extra]  # fmt: skip


def test_the_lock_file_names_its_holder_and_goes_with_it(tmp_path):
    root = tmp_path / "run"
    with run_lock(root, "build"):
        info = json.loads(lock_path(root).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        assert info["command"] == "build" and info["started"].startswith("20")
        with run_lock(str(root) + "/", "score"):  # re-entrant, under another spelling of the path
            pass
        assert lock_path(root).is_file()
    assert not lock_path(root).exists()
    assert not root.exists()  # the lock lies beside the run directory, which it does not create


def test_a_second_build_into_a_running_build_refuses_and_names_it(tmp_path, model_dir, corpus_file, capsys):
    # before: both builds exited 0, and the --overwrite one deleted the other's store under it
    root = tmp_path / "run"
    args = build_args(root, model_dir, corpus_file, "--split", "train[:4]")
    first = subprocess.Popen([sys.executable, "-m", "bergson", *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not lock_path(root).is_file() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(SystemExit) as exit_:
            main([*args, "--overwrite", "--projection_dim", "2"])
        assert exit_.value.code == 1
        err = capsys.readouterr().err
        assert f"is in use by bergson build (pid {first.pid} on host {socket.gethostname()}" in err
        assert "choose another run_path" in err and "Traceback" not in err
        with pytest.raises(BergsonError, match=f"pid {first.pid}"):
            RunLock(root, "score").acquire()
    finally:
        _, errs = first.communicate(timeout=300)
    assert first.returncode == 0, errs
    store = load_gradients(root)
    assert store.manifest.status == "complete" and len(store) == 4
    assert store.manifest.total_dim == 8 * 4 * 4  # the first build's (8 modules, projection 4), whole
    assert not lock_path(root).exists()


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    root = tmp_path / "run"
    holder = hold(root)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert json.loads(lock_path(root).read_text())["pid"] == holder.pid  # left behind
    with caplog.at_level("WARNING"), run_lock(root, "build"):
        assert json.loads(lock_path(root).read_text())["pid"] == os.getpid()
    assert f"stale lock of run_path {root} left by bergson build (pid {holder.pid}" in caplog.text
    assert "its process is gone" in caplog.text


RACE = """
import sys, time
from pathlib import Path
from bergson.core.lock import RunLock
from bergson.errors import BergsonError
root, go = sys.argv[1], Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
got = 0
for attempt in range(20):
    try:
        lock = RunLock(root, "build").acquire()
    except BergsonError:
        continue
    got += 1
    Path(root + ".holder").mkdir()  # fails if the other process holds the lock at the same time
    time.sleep(0.01)
    Path(root + ".holder").rmdir()
    lock.release()
print(got)
"""


def test_two_processes_racing_never_hold_the_lock_together(tmp_path):
    root, go = tmp_path / "run", tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, str(root), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    time.sleep(1.0)  # both started and waiting
    go.touch()
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    got = [int(out.strip()) for out, _ in outs]
    assert sum(got) >= 1 and all(g <= 20 for g in got)
    assert not lock_path(root).exists()


def test_a_launch_on_a_locked_run_path_is_refused_before_it_starts_workers(
    tmp_path, model_dir, corpus_file, capsys
):
    root = tmp_path / "run"
    holder = hold(root)
    try:
        with pytest.raises(SystemExit) as exit_:
            main(build_args(root, model_dir, corpus_file, "--nproc_per_node", "2"))
        assert exit_.value.code == 1
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and "rank" not in err  # the launcher refused, no worker started
    finally:
        holder.communicate("\n", timeout=30)
    assert not root.exists()


def test_without_flock_the_pid_decides(tmp_path, monkeypatch, caplog):
    import bergson.core.lock as lock_module

    monkeypatch.setattr(lock_module, "fcntl", None)  # a filesystem without flock
    root = tmp_path / "run"
    path = lock_path(root)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = socket.gethostname()
    for holder, refused in [
        ({"host": here, "pid": dead.pid, "command": "build"}, False),  # its process is gone: stale
        ({"host": here, "pid": os.getppid(), "command": "score"}, True),  # alive on this host
        ({"host": "elsewhere", "pid": 1, "command": "ekfac"}, True),  # another host: cannot tell
    ]:
        path.write_text(json.dumps(holder))
        if refused:
            with pytest.raises(
                BergsonError, match=f"bergson {holder['command']} \\(pid {holder['pid']} on host"
            ):
                RunLock(root, "build").acquire()
            assert json.loads(path.read_text()) == holder  # left as it was
        else:
            with caplog.at_level("WARNING"), run_lock(root, "build"):
                assert json.loads(path.read_text())["pid"] == os.getpid()
            assert "its process is gone" in caplog.text and not path.exists()
