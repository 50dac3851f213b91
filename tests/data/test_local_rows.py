"""``load_rows`` reads small plain local files with pyarrow alone; its rows, values and tokens
must be those of ``load_data`` (``datasets``)."""

from __future__ import annotations

import codecs
import gzip
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bergson.config import DataConfig
from bergson.data.load import LocalRows, load_data, load_rows
from bergson.data.tokenize import tokenize_documents
from tests.helpers.assets import ASSETS

ROWS = [
    {"text": "Hello world", "reward": 1.5, "n": 3, "ok": True},
    {"text": "", "reward": None, "n": 7, "ok": False},
    {"text": None, "reward": float("nan"), "n": -2, "ok": None},
    {"text": "naïve café 東京 🎉", "reward": 0.0, "n": 0, "ok": True},
    {"text": 'line\nbreak and "quotes"', "reward": -2.0, "n": 11, "ok": False},
    {"text": "last one", "reward": 2.5, "n": 5, "ok": True},
]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y)) or x == y
        for x, y in zip(a, b)
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("local_rows")
    plain = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in ROWS]
    lines = "".join(json.dumps(r) + "\n" for r in plain)  # JSON has no NaN
    jsonl = root / "rows.jsonl"
    jsonl.write_bytes(codecs.BOM_UTF8 + lines.encode())  # datasets drops a leading byte-order mark
    gz = root / "rows.jsonl.gz"
    gz.write_bytes(gzip.compress(lines.encode()))
    parquet = root / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), parquet)
    nested = root / "nested.jsonl"
    nested.write_text(
        json.dumps({"text": "a", "meta": {"k": 1}})
        + "\n"
        + json.dumps({"text": "b", "meta": {"j": "x"}})
        + "\n"
    )
    return {"jsonl": jsonl, "gz": gz, "parquet": parquet, "nested": nested}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ASSETS / "tiny-pythia")


@pytest.mark.parametrize(
    ("name", "split", "skip_nan"),
    [("jsonl", "train", False), ("gz", "train[1:5]", False), ("parquet", "train[:4]", True)],
)
def test_local_rows_equal_the_datasets_rows_and_tokens(files, tokenizer, name, split, skip_nan):
    cfg = DataConfig(
        dataset=str(files[name]), split=split, reward_column="reward" if skip_nan else None,
        skip_nan_rewards=skip_nan,
    )  # fmt: skip
    fast_report: dict = {}
    slow_report: dict = {}
    fast = load_rows(cfg, report=fast_report)
    slow = load_data(cfg, report=slow_report)
    assert isinstance(fast, LocalRows)  # the fast path was taken, not a fall-back to datasets
    assert fast.column_names == slow.column_names == ["text", "reward", "n", "ok"]
    assert len(fast) == len(slow) > 0
    for column in fast.column_names:
        assert _same(fast[column], slow[column]), column
    assert fast_report == slow_report
    if skip_nan:
        assert fast_report["rows_without_reward_left_out"] == 2  # None, and NaN (parquet keeps it)
    a = tokenize_documents(fast, tokenizer, cfg, 64)
    b = tokenize_documents(slow, tokenizer, cfg, 64)
    assert [x.tolist() for x in a.input_ids] == [x.tolist() for x in b.input_ids]
    assert a.loss_start.tolist() == b.loss_start.tolist()
    assert sum(len(x) for x in a.input_ids) > 10
    picked = fast.select([1, 0])
    assert picked["n"] == [fast["n"][1], fast["n"][0]] == slow.select([1, 0])["n"]


def test_what_pyarrow_would_read_differently_goes_through_datasets(files):
    # a nested column (datasets may store mixed structs as JSON), a percentage split, data_args
    for cfg in (
        DataConfig(dataset=str(files["nested"])),
        DataConfig(dataset=str(files["jsonl"]), split="train[:50%]"),
        DataConfig(dataset=str(files["jsonl"]), data_args="encoding=utf-8"),
    ):
        rows = load_rows(cfg)
        assert not isinstance(rows, LocalRows), cfg
        assert len(rows) == len(load_data(cfg))
