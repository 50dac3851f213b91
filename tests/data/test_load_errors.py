"""A dataset file that cannot be read is a BergsonError naming the file, the problem and the fix."""

from __future__ import annotations

import gzip

import pytest

from bergson.cli import main
from bergson.config import DataConfig
from bergson.data.load import load_data
from bergson.errors import BergsonError

CASES = {
    "empty.jsonl": (b"", "it is empty (no rows)"),
    "blank.jsonl": (b"\n  \n", "holds no rows"),
    "bad.jsonl": (b'{"text": "a"}\n{"text": "b"}\n{"text": "broken\n', "line 3 is not valid JSON"),
    "list.jsonl": (b'{"text": "a"}\n[1, 2]\n{"text": "b"}\n', "line 2 holds a JSON list, not an object"),
    "bad.jsonl.gz": (gzip.compress(b'{"text": "a"}\n{oops}\n'), "line 2 is not valid JSON"),
    "empty.csv": (b"", "it is empty (no rows)"),
    "header.csv": (b"text,label\n", "holds no rows"),
    "bad.csv": (b'text\n"never closed\n', "EOF inside string"),
    "bad.parquet": (b"PAR1 not really parquet", "bad.parquet"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_unreadable_files_name_the_file_and_the_problem(tmp_path, name):
    content, message = CASES[name]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BergsonError) as e:
        load_data(DataConfig(dataset=str(path)))
    assert message in str(e.value) and str(path) in str(e.value)


def test_an_empty_slice_is_refused(corpus_file):
    with pytest.raises(BergsonError, match=r"split 'train\[:0\]'\) holds no rows"):
        load_data(DataConfig(dataset=str(corpus_file), split="train[:0]"))


def test_a_good_file_after_a_bad_one_of_the_same_name_loads(tmp_path):
    # the failed load leaves nothing behind in the datasets cache that a fixed file would meet
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(BergsonError):
        load_data(DataConfig(dataset=str(path)))
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert load_data(DataConfig(dataset=str(path)))["text"] == ["a", "b"]


def test_empty_and_malformed_files_fail_cleanly_from_the_command_line(tmp_path, model_dir, capsys):
    # before: a StopIteration traceback (empty) and a DatasetGenerationError traceback (malformed)
    for name in ("empty.jsonl", "bad.jsonl"):
        path = tmp_path / name
        path.write_bytes(CASES[name][0])
        with pytest.raises(SystemExit) as exit_:
            main(["build", str(tmp_path / "out"), "--model", str(model_dir), "--dataset", str(path)])
        assert exit_.value.code == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and f"bergson build: error: --dataset {path}" in err
        assert CASES[name][1] in err and "fix or replace the file" in err
