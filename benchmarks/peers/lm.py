"""The causal-LM workload: the shipped tiny-pythia, the first documents of the shipped corpus
and the shipped queries (their full ``text``), run by ours, the published bergson and
kronfluence.

* ``grad_dot``: exact (unprojected, ``--projection_dim 0``) per-document gradients of the
  summed next-token loss from ``bergson build`` (ours) and the published ``bergson build
  --loss_reduction sum``, over the training documents and over the queries, for the 8 linear
  layers of ``gpt_neox.layers`` (what the published build tracks by default; ours gets
  ``--modules "gpt_neox.layers.*"``); the score of a (query, document) pair is the dot product
  of their gradients, summed over modules (each tool with its own module names).
* ``ekfac``: ``bergson ekfac`` (ours) and kronfluence 1.0.1 (``_kronfluence_worker.py``) with
  the same sampled-label true Fisher, absolute damping and tracked modules (every linear layer
  of ``gpt_neox.layers``; the 8k-vocabulary output head is left out by both, its factor would
  be 8192 x 8192).
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..common import ASSETS, CORPUS

MODEL = ASSETS / "tiny-pythia"
TOKEN_BATCH = 1024  # the shipped tokenizer's model_max_length; both CLIs accept it
MAX_LENGTH = 128
DAMPING = 0.001


def make_data(root: Path, num_docs: int) -> dict[str, Path]:
    """``train.jsonl`` (the first ``num_docs`` corpus documents) and ``queries.jsonl`` (the
    shipped queries' ``text``), both with a single ``text`` column."""
    root.mkdir(parents=True, exist_ok=True)
    with gzip.open(CORPUS, "rt") as f:
        docs = [json.loads(line)["text"] for _, line in zip(range(num_docs), f)]
    queries = [
        json.loads(line)["text"] for line in (ASSETS / "queries.jsonl").read_text().splitlines() if line
    ]
    train, query = root / "train.jsonl", root / "queries.jsonl"
    train.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    query.write_text("".join(json.dumps({"text": t}) + "\n" for t in queries))
    return {"train": train, "queries": query}


def build_args(out: Path, data: Path) -> list[str]:
    """``bergson build`` options shared by ours and the published CLI."""
    return [
        "build", str(out), "--model", str(MODEL), "--dataset", str(data), "--truncation",
        "--token_batch_size", str(TOKEN_BATCH), "--projection_dim", "0", "--precision", "fp32",
    ]  # fmt: skip


def ours_build(out: Path, data: Path) -> list[str]:
    # the published build tracks the 8 linear layers of gpt_neox.layers and not the output head
    return [sys.executable, "-m", "bergson", *build_args(out, data), "--modules", "gpt_neox.layers.*"]


def peer_build(peer_bin: Path, out: Path, data: Path) -> list[str]:
    return [str(peer_bin), *build_args(out, data), "--loss_reduction", "sum"]


def dot_scores(train: dict[str, np.ndarray], queries: dict[str, np.ndarray]) -> tuple[np.ndarray, list[str]]:
    """[queries, train] sums over the modules present in both of q_m · t_m."""
    common = sorted(set(train) & set(queries))
    if not common:
        raise ValueError("the training and query vectors share no module")
    total = sum(queries[m] @ train[m].T for m in common)
    return np.asarray(total, np.float64), common


def ours_ekfac(out: Path, data: dict[str, Path]) -> list[str]:
    return [
        sys.executable, "-m", "bergson", "ekfac", str(out), "--model", str(MODEL),
        "--dataset", str(data["train"]), "--truncation", "--max_length", str(MAX_LENGTH),
        "--token_batch_size", str(TOKEN_BATCH), "--query.dataset", str(data["queries"]),
        "--query.truncation", "--query.max_length", str(MAX_LENGTH), "--modules", "gpt_neox.layers.*",
        "--damping", str(DAMPING), "--damping_mode", "absolute", "--top_k", "0", "--overwrite",
    ]  # fmt: skip


def ours_ekfac_scores(out: Path) -> np.ndarray:
    from bergson import load_gradients

    return np.asarray(load_gradients(out / "scores")["scores"], np.float64).T


def kronfluence_args(data: dict[str, Path], out: Path, timeout_s: float) -> Any:
    """The namespace ``kronfluence_ekfac.run`` takes: the same settings as ``ours_ekfac``."""
    from . import kronfluence_ekfac as kf

    return kf.run_args(
        str(MODEL), str(data["train"]), str(data["queries"]), MAX_LENGTH, DAMPING, out, timeout_s,
        exclude_modules="lm_head",
    )  # fmt: skip
