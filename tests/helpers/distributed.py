"""Shared by the tests of several workers: the command line in a subprocess, the options of a
small build, the one-process store a launch must equal, and the EK-FAC run on one and on two."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bergson import EkfacConfig, GradientStore, build, ekfac
from bergson.config import DataConfig
from tests.helpers.stores import make_cfg

SHARD_SIZE = 5  # 24 documents: 5 shards, so that each of two ranks gets several


def cli(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def options(model_dir: Path, corpus_file: Path, *extra: str) -> list[str]:
    """The command-line twin of ``make_cfg(..., save_dtype='float32', shard_size=SHARD_SIZE)``."""
    return [
        "--model",
        str(model_dir),
        "--dataset",
        str(corpus_file),
        "--truncation",
        "--token_batch_size",
        "256",
        "--projection_dim",
        "4",
        "--save_dtype",
        "float32",
        "--shard_size",
        str(SHARD_SIZE),
        *extra,
    ]


def without(args: list[str], *flags: str) -> list[str]:
    """``args`` less each of ``flags`` and its value (for a command that does not offer them)."""
    out = list(args)
    for flag in flags:
        i = out.index(flag)
        del out[i : i + 2]
    return out


def one_cfg(tmp_path: Path, model_dir: Path, corpus_file: Path, name: str, **kw):
    return make_cfg(
        tmp_path, model_dir, corpus_file, name=name, save_dtype="float32", shard_size=SHARD_SIZE, **kw
    )


def manifest_json(store: GradientStore) -> dict:
    """The manifest without what may differ between worker counts: the producer (bergson version and
    number of workers) and each shard file's digest. Each worker batches its own share of the
    documents, and a batch's composition can change the float32 rounding of its matrix products (about
    1e-7 relatively; the bytes matched with the packages installed on 2026-12-02 and differ with those
    of 2026-12-03, transformers 5.25 among them), so the bytes may differ while the values agree:
    :func:`assert_same_store` compares the values themselves, and the row-norm summary (computed from
    them) to float32 rounding."""
    m = json.loads((store.root / "manifest.json").read_text())
    m.pop("producer")
    m.pop("norms", None)
    for shard in m.get("shards", []):
        shard.pop("sha256", None)
    return m


def norm_summary(store: GradientStore) -> dict:
    """The manifest's summary of the row norms (median and the like), {} without one."""
    return json.loads((store.root / "manifest.json").read_text()).get("norms") or {}


def assert_same_store(one: GradientStore, two: GradientStore) -> None:
    assert manifest_json(two) == manifest_json(one)
    want, got = norm_summary(one), norm_summary(two)
    assert got.keys() == want.keys()
    for key, value in want.items():
        same = pytest.approx(value, rel=1e-5) if isinstance(value, float) else value
        assert got[key] == same, key
    np.testing.assert_array_equal(two.rows["row_id"], one.rows["row_id"])
    np.testing.assert_array_equal(two.rows["num_tokens"], one.rows["num_tokens"])
    np.testing.assert_allclose(two.rows["loss"], one.rows["loss"], rtol=1e-5)
    a, b = np.asarray(one.all, np.float64), np.asarray(two.all, np.float64)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_dir, corpus_file) -> GradientStore:
    """The store one process builds (in this process, through the Python API)."""
    return build(one_cfg(tmp_path_factory.mktemp("one"), model_dir, corpus_file, "index"))


def assert_close(b: np.ndarray, a: np.ndarray) -> None:
    """Equal up to the float rounding of sums taken in another order."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * max(np.abs(a).max(), 1e-30))


def ekfac_cli(
    out: Path, model_dir: Path, corpus_file: Path, split: str, token_batch_size: str, *extra: str
) -> tuple[str, ...]:
    """``bergson ekfac OUT`` on the documents ``split`` (and queries 20-22) of the test corpus,
    cut to 32 tokens, tracking the transformer layers."""
    return (
        "bergson", "ekfac", str(out), "--model", str(model_dir), "--dataset", str(corpus_file), "--split",
        split, "--truncation", "--max_length", "32", "--token_batch_size", token_batch_size,
        "--query.dataset", str(corpus_file), "--query.split", "train[20:23]", "--query.truncation",
        "--query.max_length", "32", "--modules", "gpt_neox.layers.*", *extra,
    )  # fmt: skip


def ekfac_one(out: Path, model_dir: Path, corpus_file: Path, split: str, token_batch_size: int, **options):
    """The one-process run (in this process) that :func:`ekfac_cli` ``out ... split token_batch_size``
    describes, with further ``EkfacConfig`` options."""
    data = DataConfig(dataset=str(corpus_file), split=split, truncation=True, max_length=32)
    query = DataConfig(dataset=str(corpus_file), split="train[20:23]", truncation=True, max_length=32)
    cfg = EkfacConfig(
        run_path=str(out),
        model=str(model_dir),
        data=data,
        query=query,
        token_batch_size=token_batch_size,
        modules=["gpt_neox.layers.*"],
        **options,
    )
    return ekfac(cfg)
