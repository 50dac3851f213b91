"""Fixtures: tiny models built in-process and small slices of the shipped example assets."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers.assets import ASSETS, HOSTILE, HOSTILE_ROW

# No test may reach the hub: the hub ids some tests name (the original README's, typed verbatim)
# resolve to local stand-ins (tests/helpers/standins.py), never to a download, whatever the
# environment says.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite runs in pytest-xdist processes (pyproject's addopts: one per core, at most 4), each
# with one thread; a run in one process (-n 0) keeps two.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


def _refuse_the_network() -> None:
    """Make any connection from the test process to a non-loopback address fail loudly, so that a
    test naming a hub id can only pass through its local stand-in (workers on localhost, and
    torch.distributed's own C++ sockets, are unaffected)."""
    import ipaddress
    import socket

    connect = socket.socket.connect

    def local_only(self: socket.socket, address: object) -> None:
        host = address[0] if isinstance(address, tuple) else None
        if host is not None and host != "localhost":
            try:
                loopback = ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                raise OSError(f"tests may not reach the network (tried {address!r})")
        connect(self, address)  # type: ignore[arg-type]

    socket.socket.connect = local_only  # type: ignore[method-assign]


_refuse_the_network()


def _float64_softmax_stays_float64() -> None:
    """transformers' eager attention takes its softmax with ``dtype=torch.float32`` whatever the
    model's dtype, so a float64 model's attention weights are rounded to float32. Where the CPU's
    float32 reductions are 8 lanes wide (AVX2), that rounding depends on the padded length of the
    row, and a document's gradient in a padded batch differs from its gradient alone by ~1e-6
    (measured on an AMD EPYC; AVX-512 machines reduce a short row in one vector and agree to
    1e-16). The ground-truth tests compare float64 models to 1e-9, which is about our algebra,
    not transformers' float32 softmax: in the test process a float64 input keeps its softmax in
    float64. Worker processes the tests launch are not patched (their tests compare loosely)."""
    softmax = torch.nn.functional.softmax

    def float64_softmax(input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if input.dtype == torch.float64 and kwargs.get("dtype") == torch.float32:
            kwargs["dtype"] = torch.float64
        return softmax(input, *args, **kwargs)

    torch.nn.functional.softmax = float64_softmax  # type: ignore[assignment]


_float64_softmax_stays_float64()


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """The first 24 documents of the shipped corpus (cut to 600 characters) as a .jsonl file."""
    out = tmp_path_factory.mktemp("data") / "corpus.jsonl"
    with gzip.open(ASSETS / "corpus.jsonl.gz", "rt") as f:
        rows = [json.loads(next(f)) for _ in range(24)]
    out.write_text("".join(json.dumps({**r, "text": r["text"][:600]}) + "\n" for r in rows))
    return out


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A small random GPT-NeoX saved with the shipped tokenizer (fast to run on CPU)."""
    from benchmarks.common import random_neox_dir

    out = tmp_path_factory.mktemp("model")
    return random_neox_dir(out, hidden=32, layers=2, heads=2, intermediate=64, max_positions=512)


# Stores for the report, serve and option tests: a per-token gradient store over a slice of the
# shipped corpus (one document carries HTML that must stay text), a query store and the scores of
# the one against the other.
@pytest.fixture(scope="session")
def report_stores(tmp_path_factory, model_dir, corpus_file) -> dict[str, Any]:
    from bergson import IndexConfig, ScoreConfig, build, score
    from bergson.config import DataConfig

    root = tmp_path_factory.mktemp("report")
    rows = [json.loads(line) for line in Path(corpus_file).read_text().splitlines()]
    rows[HOSTILE_ROW]["text"] = HOSTILE + " " + rows[HOSTILE_ROW]["text"]
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common: dict[str, Any] = dict(
        model=str(model_dir), precision="fp32", device="cpu", projection_dim=4, save_dtype="float32"
    )
    data = dict(dataset=str(corpus), truncation=True, max_length=40)
    store = build(IndexConfig(run_path=str(root / "docs"), data=DataConfig(**data), per_token=True, **common))
    query = build(IndexConfig(run_path=str(root / "q"), data=DataConfig(**data, split="train[:3]"), **common))
    scores = score(
        ScoreConfig(
            run_path=str(root / "scores"),
            index=str(store.root),
            query_path=str(query.root),
            per_token=True,
            **common,
        )
    )
    texts = [r["text"] for r in rows]
    return {"root": root, "store": store, "query": query, "scores": scores, "texts": texts, "common": common}


@pytest.fixture(scope="session")
def query_hits(report_stores) -> tuple[str, list[dict[str, Any]]]:
    """A query text and its hits (5 proponents, 3 opponents) with per-token splits."""
    from bergson import QueryConfig
    from bergson.querying import query

    store = report_stores["store"]
    text = "The river flows through the old town"
    common = {k: v for k, v in report_stores["common"].items() if k in ("model", "precision", "device")}
    hits = query(QueryConfig(index=str(store.root), query=text, top_k=5, per_token=True, **common))
    hits += query(
        QueryConfig(index=str(store.root), query=text, top_k=3, per_token=True, reverse=True, **common)
    )
    return text, hits


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Where screenshots go: $BERGSON_TEST_ARTIFACTS, or tests/artifacts (ignored by git)."""
    import os

    out = Path(os.environ.get("BERGSON_TEST_ARTIFACTS") or Path(__file__).resolve().parent / "artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out
