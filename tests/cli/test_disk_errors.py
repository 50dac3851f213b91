"""A full disk, a read-only filesystem and a forbidden directory give clean errors naming the
path and the fix; a build stopped by a full disk keeps its completed shards, and rerunning it
once there is space completes the store identically."""

from __future__ import annotations

import builtins
import errno
import os
from pathlib import Path

import pytest

import bergson.core.files as files
from bergson.cli import main
from bergson.store import load_gradients


def build_args(root: Path, model_dir: Path, corpus_file: Path) -> list[str]:
    return ["build", str(root), "--model", str(model_dir), "--dataset", str(corpus_file), "--split", "train[:12]",
            "--truncation",
            "--token_batch_size", "256", "--projection_dim", "4", "--device", "cpu", "--shard_size", "4",
            "--save_dtype", "float32"]  # fmt: skip


class Disk:
    """A disk for the writes of bergson's atomic file writer: ``budget`` bytes, then ENOSPC
    (or every write refused with ``error``)."""

    def __init__(self, budget: int = 0, error: int = errno.ENOSPC):
        self.budget, self.error, self.used = budget, error, 0

    def open(self, path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)  # noqa: SIM115 - handed to the caller
        if "w" not in mode:
            return f
        disk, write = self, f.write

        def limited(data):
            if disk.error != errno.ENOSPC or disk.used + len(data) > disk.budget:
                raise OSError(
                    disk.error, os.strerror(disk.error), None if disk.error == errno.ENOSPC else str(path)
                )
            disk.used += len(data)
            return write(data)

        f.write = limited
        return f


def fail_with(monkeypatch, capsys, args: list[str], disk: Disk) -> str:
    monkeypatch.setattr(files, "open", disk.open, raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(args)
    monkeypatch.undo()
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "OSError" not in err
    return err


def arrays(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "shards").iterdir())}


def test_a_full_disk_stops_cleanly_and_the_rerun_completes_the_same_store(
    tmp_path, model_dir, corpus_file, monkeypatch, capsys
):
    reference = tmp_path / "reference"
    main(build_args(reference, model_dir, corpus_file))
    full = tmp_path / "full"
    # before: OSError: [Errno 28] No space left on device, with a traceback
    err = fail_with(monkeypatch, capsys, build_args(full, model_dir, corpus_file), Disk(budget=12_000))
    assert f"cannot write {full}: the disk is full ([Errno 28])" in err
    assert "rerun the same command" in err and "resumes" in err
    kept = sorted(p.name for p in (full / "shards").glob("*.npy"))
    assert 1 <= len(kept) < 3, kept  # some shards completed, the disk filled before the last
    assert not [p for p in full.rglob("*.tmp")], "a half-written temporary file was left behind"
    main(build_args(full, model_dir, corpus_file))  # space freed: the rerun resumes
    assert arrays(full) == arrays(reference)
    store = load_gradients(full)
    assert store.manifest.status == "complete" and len(store) == 12


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (errno.EROFS, "the filesystem is read-only ([Errno 30])"),
        (errno.EACCES, "permission denied ([Errno 13])"),
    ],
)
def test_a_read_only_disk_is_named_with_the_fix(
    tmp_path, model_dir, corpus_file, monkeypatch, capsys, error, message
):
    root = tmp_path / "out"
    # before: OSError: [Errno 30] Read-only file system: 'out/.manifest.json.<pid>.<hex>.tmp', with a traceback
    err = fail_with(monkeypatch, capsys, build_args(root, model_dir, corpus_file), Disk(error=error))
    assert f" {root}: {message}" in err and ".tmp" not in err  # the directory, not the temporary file
    assert "choose a run_path" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_a_directory_without_write_permission(tmp_path, model_dir, corpus_file, capsys):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(SystemExit) as exit_:
            main(build_args(parent / "run", model_dir, corpus_file))
        assert exit_.value.code == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and str(parent) in err and "writable" in err
    finally:
        parent.chmod(0o755)
