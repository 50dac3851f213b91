"""Scores stores and the rows they rank: a score matrix computed elsewhere (EK-FAC, MAGIC) written
as an ordinary scores store, the top rows of each score column, token rows padded into one
array."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..core.layout import ModuleLayout
from .manifest import SCORE_ORIENTATION, Manifest
from .reader import GradientStore, load_gradients
from .writer import StoreWriter


def pad_token_rows(parts: list[np.ndarray], dim: int) -> np.ndarray:
    """Rows' token arrays ([length_i, dim] each) as one zero-padded [rows, longest, dim] array."""
    out = np.zeros((len(parts), max((len(p) for p in parts), default=0), dim), np.float32)
    for i, p in enumerate(parts):
        out[i, : len(p)] = p
    return out


def top_rows(store: GradientStore, k: int) -> list[list[tuple[int, float]]]:
    """(dataset row, score) of the k highest scores in each column of a scores store."""
    s = np.asarray(store["scores"], np.float32)
    out: list[list[tuple[int, float]]] = []
    for c in range(s.shape[1]):
        order = np.argsort(-s[:, c], kind="stable")[:k]
        out.append([(int(store.rows["row_id"][i]), float(s[i, c])) for i in order])
    return out


def save_score_matrix(
    path: str | Path,
    scores: np.ndarray,
    base_manifest: Manifest,
    info: dict[str, Any],
    overwrite: bool,
    tokens: list[np.ndarray] | None = None,
) -> GradientStore:
    """Write a [rows, columns] score matrix computed elsewhere (EK-FAC, MAGIC) as an ordinary
    scores store, with ``base_manifest``'s model and data and ``info`` as its score entry;
    ``tokens`` (per row, [length, columns]) become its token rows."""
    n, nq = scores.shape
    manifest = replace(
        base_manifest,
        kind="scores",
        status="in_progress",
        modules=[ModuleLayout("scores", "scores", [nq], False, 0, nq)],
        dtype="float32",
        score={**info, "columns": nq, "orientation": SCORE_ORIENTATION},
        per_token=tokens is not None,
    )
    writer = StoreWriter(path, manifest, overwrite=overwrite)
    if not writer.complete:
        writer.begin_shard(0, range(n))
        lengths = np.zeros(n, np.int64) if tokens is None else np.array([len(t) for t in tokens])
        padded = None if tokens is None else pad_token_rows(tokens, nq)
        writer.write(np.arange(n), scores.astype(np.float32), lengths, np.zeros(n, np.float32), padded)
        writer.end_shard(0)
        writer.finalize(1)
    return load_gradients(path)
