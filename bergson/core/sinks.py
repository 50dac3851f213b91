"""Where a pass over the documents sends its per-row vectors: the one interface between the
collection loop (which makes vectors) and what keeps them (a store writer, a scorer, statistics)."""

from __future__ import annotations

from typing import Any

import numpy as np


class Sink:
    """Receives per-row vectors one shard (a range of dataset rows) at a time.

    ``num_tokens`` are the rows' lengths; with per-token collection ``tokens`` [B, S, dim]
    holds each position's vector (row b's first ``num_tokens[b]`` positions are its own).
    A subclass writes ``write`` and inherits the rest: no shard is complete, and beginning
    or ending one does nothing."""

    def done(self, index: int) -> bool:
        return False

    def begin_shard(self, index: int, rows: range) -> None:
        return None

    def write(
        self,
        row_ids: np.ndarray,
        vectors: np.ndarray,
        num_tokens: np.ndarray,
        losses: np.ndarray,
        tokens: np.ndarray | None = None,
    ) -> None:
        raise NotImplementedError

    def end_shard(self, index: int) -> None:
        return None


class WriterSink(Sink):
    """A sink that turns rows into others (scores, norms) and hands them to a store writer
    (``self.writer``, with ``done``/``begin_shard``/``end_shard``), which keeps the shards."""

    writer: Any

    def done(self, index: int) -> bool:
        return self.writer.done(index)

    def begin_shard(self, index: int, rows: range) -> None:
        self.writer.begin_shard(index, rows)

    def end_shard(self, index: int) -> None:
        self.writer.end_shard(index)
