"""Damaged stores, checksums and non-finite rows.

Every kind of damage a store can suffer on disk (:data:`tests.helpers.damage.DAMAGES`) is one
clear error naming the damaged file, from the Python API and from the command line (exit 1, no
traceback); ``bergson verify`` checks everything (checksums and values included) and names each
bad file; a writer stores non-finite rows as zeros and lists them, and readers say so."""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bergson import BergsonError, exact_topk, load_gradients, verify_store
from bergson.cli import main
from bergson.store import StoreWriter, reader
from tests.helpers.damage import DAMAGES
from tests.helpers.stores import synthetic_store

ROWS, DIM, SHARD = 40, 8, 16


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """A good store of three shards (float32, so that values compare exactly) and a query store
    of the same layout."""
    root = tmp_path_factory.mktemp("damaged")
    rng = np.random.default_rng(0)
    synthetic_store(root / "good", rng.normal(size=(ROWS, DIM)), [DIM], "float32", shard_size=SHARD)
    synthetic_store(root / "query", rng.normal(size=(2, DIM)), [DIM], "float32")
    return {"good": root / "good", "query": root / "query"}


def damaged_copy(stores: dict[str, Path], tmp_path: Path, kind: str) -> tuple[Path, Path]:
    """A copy of the good store with ``kind`` of damage; and the damaged file."""
    root = tmp_path / "store"
    shutil.copytree(stores["good"], root)
    return root, root / DAMAGES[kind](root)


@pytest.mark.parametrize("kind", list(DAMAGES))
def test_opening_a_damaged_store_names_the_file(stores, tmp_path, kind):
    root, bad = damaged_copy(stores, tmp_path, kind)
    with pytest.raises(BergsonError) as err:
        load_gradients(root)
    assert str(bad) in str(err.value)
    assert "rebuild the store" in str(err.value)


@pytest.mark.parametrize("kind", list(DAMAGES))
@pytest.mark.parametrize("command", ["score", "query"])
def test_commands_on_a_damaged_store_exit_1_without_a_traceback(stores, tmp_path, capsys, kind, command):
    root, bad = damaged_copy(stores, tmp_path, kind)
    if command == "score":
        args = ["score", "--index", str(root), "--query_path", str(stores["query"]), str(tmp_path / "out")]
    else:  # the store is opened before the model is loaded: the model is never reached
        args = ["query", "--index", str(root), "--model", str(tmp_path / "no_model"), "--query", "x"]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert f"bergson {command}: error: {bad}" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written from a damaged store


def test_verify_passes_a_good_store_and_matches_every_checksum(stores, capsys):
    report = verify_store(stores["good"])
    assert report.ok and report.problems == []
    assert (report.shards, report.rows) == (3, ROWS)
    assert report.checksums == 6  # each shard's .npy and .rows.parquet
    main(["verify", str(stores["good"])])  # exits 0: no SystemExit
    assert capsys.readouterr().out.startswith(f"{stores['good']}: ok: 3 shards, {ROWS} rows")
    manifest = json.loads((stores["good"] / "manifest.json").read_text())
    assert all(len(s["sha256"]["npy"]) == 64 for s in manifest["shards"])


@pytest.mark.parametrize("kind", list(DAMAGES))
def test_verify_names_each_damaged_file(stores, tmp_path, capsys, kind):
    root, bad = damaged_copy(stores, tmp_path, kind)
    report = verify_store(root)
    assert not report.ok
    assert len(report.problems) == 1 and str(bad) in report.problems[0]
    with pytest.raises(SystemExit) as exit_:
        main(["verify", str(root)])
    assert exit_.value.code == 1
    out, err = capsys.readouterr()
    assert f"problem: {bad}" in out and "bergson verify: error:" in err and "Traceback" not in err


def test_a_flipped_byte_is_caught_by_the_checksum_only(stores, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(stores["good"], root)
    npy = root / "shards/00001.npy"
    data = bytearray(npy.read_bytes())
    data[-5] ^= 0x01  # one bit of one value: still a well-formed, finite shard
    npy.write_bytes(bytes(data))
    store = load_gradients(root)  # the cheap checks on open cannot see it
    assert len(store) == ROWS
    report = verify_store(root)
    assert not report.ok
    assert report.problems == [
        f"{npy}: its sha256 differs from the one recorded when it was written (the file changed since)"
    ]
    assert report.checksums == 5


def test_several_damaged_shards_are_each_named(stores, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(stores["good"], root)
    (root / "shards/00002.npy").write_bytes((root / "shards/00002.npy").read_bytes()[:-4])
    (root / "shards/00001.rows.parquet").write_bytes(b"not parquet")
    problems = verify_store(root).problems
    assert len(problems) == 2
    assert str(root / "shards/00001.rows.parquet") in problems[0]
    assert str(root / "shards/00002.npy") in problems[1]


def test_manifest_fields_of_the_wrong_kind_are_named(stores, tmp_path):
    for change, words in (
        (lambda m: m["shards"][0].update(file="../../elsewhere"), "outside the store"),
        (lambda m: m.update(num_rows="40"), "'num_rows' is '40'"),
        (lambda m: m["modules"][0].pop("dim"), "module 0"),
        (lambda m: m.update(dtype="float99"), "not a numpy dtype"),
        (lambda m: m.update(extra=1), "unknown fields ['extra']"),
    ):
        root = tmp_path / "store"
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(stores["good"], root)
        manifest = json.loads((root / "manifest.json").read_text())
        change(manifest)
        (root / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(BergsonError, match=rf"manifest\.json is damaged: .*{re.escape(words)}") as err:
            load_gradients(root)
        assert str(root / "manifest.json") in str(err.value)


def test_a_store_of_format_1_still_reads(stores, tmp_path):
    """A store written before checksums and records: opened and verified, with notes."""
    root = tmp_path / "store"
    shutil.copytree(stores["good"], root)
    manifest = json.loads((root / "manifest.json").read_text())
    for key in ("nonfinite", "norms"):
        manifest.pop(key)
    for shard in manifest["shards"]:
        shard.pop("sha256")
    manifest["format_version"] = 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert len(load_gradients(root)) == ROWS
    report = verify_store(root)
    assert report.ok and report.checksums == 0
    assert any("no checksums were recorded" in n for n in report.notes)


def test_nonfinite_rows_are_stored_as_zeros_listed_and_said(tmp_path, caplog, monkeypatch):
    rng = np.random.default_rng(1)
    array = rng.normal(size=(ROWS, DIM))
    array[5, 2] = np.nan
    array[20, 0] = np.inf
    with caplog.at_level(logging.WARNING, logger="bergson"):
        synthetic_store(tmp_path / "s", array, [DIM], "float32", shard_size=SHARD)
    written = caplog.text
    assert (
        "2 rows had non-finite values (NaN or inf) and are stored as zeros (dataset rows [5, 20])" in written
    )
    manifest = json.loads((tmp_path / "s/manifest.json").read_text())
    assert manifest["nonfinite"] == {
        "count": 2,
        "row_ids": [5, 20],
        "listed_all": True,
        "action": "stored as zeros",
    }
    caplog.clear()
    monkeypatch.setattr(reader, "_WARNED", set())  # as a new process: said once per process
    with caplog.at_level(logging.WARNING, logger="bergson"):
        store = load_gradients(tmp_path / "s")
        load_gradients(tmp_path / "s")
    assert caplog.text.count("non-finite") == 1
    assert "2 rows had non-finite gradients (NaN or inf) when written" in caplog.text
    values = np.asarray(store.all)
    np.testing.assert_array_equal(values[[5, 20]], 0.0)
    keep = np.setdiff1d(np.arange(ROWS), [5, 20])
    np.testing.assert_array_equal(values[keep], array[keep].astype(np.float32))
    report = verify_store(tmp_path / "s")
    assert report.ok and any("2 rows had non-finite values when written" in n for n in report.notes)
    from bergson.reports.data import manifest_summary

    assert (
        manifest_summary(store.manifest, "s")["non-finite rows"]
        == "2 rows (stored as zeros): dataset rows 5, 20"
    )


def test_a_nonfinite_row_of_an_older_store_is_never_ranked_and_is_named(stores, tmp_path, caplog):
    """A store written before the writer zeroed such rows: an inf value would rank first."""
    root = tmp_path / "store"
    shutil.copytree(stores["good"], root)
    npy = root / "shards/00000.npy"
    shard = np.load(npy)
    shard[3, 0] = np.inf
    shard[7, 1] = np.nan
    np.save(npy, shard)
    store = load_gradients(root)  # sizes agree: it opens
    query = np.ones((1, DIM), np.float32)
    with caplog.at_level(logging.WARNING, logger="bergson"):
        scores, rows = exact_topk(store, query, k=ROWS)
    assert "2 stored rows hold non-finite values (NaN or inf): dataset rows [3, 7]" in caplog.text
    assert "left out of the ranking" in caplog.text
    good = np.setdiff1d(np.arange(ROWS), [3, 7])
    expected = np.asarray(store.all, np.float64)[good] @ query[0]
    np.testing.assert_array_equal(rows[0, : len(good)], good[np.argsort(-expected, kind="stable")])
    np.testing.assert_array_equal(rows[0, len(good) :], -1)
    np.testing.assert_allclose(scores[0, : len(good)], np.sort(expected)[::-1], rtol=1e-5)
    report = verify_store(root)
    assert report.nonfinite_rows == [3, 7]
    assert any(f"{npy}: 2 rows hold non-finite values" in p for p in report.problems)


def test_norm_outliers_are_recorded_against_the_median(tmp_path, caplog):
    rng = np.random.default_rng(2)
    array = rng.normal(size=(ROWS, DIM))
    array[11] *= 200.0
    array[30] = 0.0  # a document without a loss token: not counted in the median
    with caplog.at_level(logging.WARNING, logger="bergson"):
        synthetic_store(tmp_path / "s", array, [DIM], "float32", shard_size=SHARD)
    norms = np.linalg.norm(array.astype(np.float32).astype(np.float64), axis=1)
    median = float(np.median(norms[norms > 0]))
    manifest = json.loads((tmp_path / "s/manifest.json").read_text())
    assert manifest["norms"]["median"] == pytest.approx(median, rel=1e-6)
    assert manifest["norms"]["outliers"]["row_ids"] == [11]
    assert "1 rows have a norm above 10x the median row norm" in caplog.text
    store = load_gradients(tmp_path / "s")
    np.testing.assert_allclose(
        np.concatenate([np.load(tmp_path / f"s/shards/{i:05d}.npy").astype(np.float64) for i in range(3)]),
        np.asarray(store.all),
    )
    # the report's summary of the store says so too
    from bergson.reports.data import manifest_summary

    note = manifest_summary(store.manifest, "s")["norm outliers"]
    assert note.startswith("1 rows (norm above 10") and note.endswith("dataset rows 11")
    assert "non-finite rows" not in manifest_summary(store.manifest, "s")


def test_per_token_stores_zero_nonfinite_token_rows_and_check_their_file(stores, tmp_path):
    base = load_gradients(stores["good"]).manifest
    manifest = replace(base, status="in_progress", per_token=True, shards=[], nonfinite=None, norms=None)
    writer = StoreWriter(tmp_path / "tok", manifest)
    writer.begin_shard(0, range(3))
    tokens = np.ones((3, 2, DIM))
    tokens[1, 1, 4] = np.nan
    writer.write(np.arange(3), tokens.sum(1), np.array([2, 2, 1]), np.zeros(3, np.float32), tokens)
    writer.end_shard(0)
    writer.finalize(1)
    store = load_gradients(tmp_path / "tok")
    assert store.manifest.nonfinite is not None and store.manifest.nonfinite["row_ids"] == [1]
    np.testing.assert_array_equal(store.token_rows(1), 0.0)
    np.testing.assert_array_equal(store.token_rows(0), 1.0)
    assert verify_store(tmp_path / "tok").checksums == 3
    tok = tmp_path / "tok/shards/00000.tokens.npy"
    tok.write_bytes(tok.read_bytes()[:-8])
    with pytest.raises(BergsonError, match=f"{tok} is damaged: .*truncated"):
        load_gradients(tmp_path / "tok")


def test_verify_reads_a_store_of_the_original_package(tmp_path):
    from tests.helpers.legacy_store import write_legacy_part

    grads = np.random.default_rng(3).normal(size=(4, 6)).astype(np.float32)
    grads[2, 1] = np.nan
    root = write_legacy_part(tmp_path / "old", grads, {"a": 2, "b": 4}, ["w"] * 4, dtype="float32")
    report = verify_store(root)
    assert report.nonfinite_rows == [2] and not report.ok
    assert any("recorded no checksums" in n for n in report.notes)
    (root / "gradients.bin").write_bytes((root / "gradients.bin").read_bytes()[:-4])
    report = verify_store(root)
    assert len(report.problems) == 1 and str(root / "gradients.bin") in report.problems[0]
    with pytest.raises(BergsonError, match="not a bergson store"):
        verify_store(tmp_path / "nothing")
