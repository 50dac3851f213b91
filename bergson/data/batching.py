"""Shards and token-budget batches.

The store is written in shards of consecutive dataset rows. Within a shard, documents
are sorted by length (longest first) and packed greedily into batches whose padded
size (documents x longest document) stays within the token budget. The plan depends
only on the document lengths, so it is the same on every run; that is what lets a
killed build resume at the first incomplete shard. Several ranks split the shards
whole, balancing their token counts (:func:`assign_shards`).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import BergsonError
from .tokenize import TokenizedDocs

IGNORE = -100
"""The label of a position that carries no loss (the ignore index of PyTorch's cross-entropy)."""


def plan_shards(num_rows: int, shard_size: int) -> list[range]:
    """Consecutive row ranges of at most ``shard_size`` rows."""
    if shard_size < 1:
        raise BergsonError(f"--shard_size {shard_size}: must be at least 1")
    return [range(s, min(s + shard_size, num_rows)) for s in range(0, num_rows, shard_size)]


def assign_shards(costs: Sequence[int], num_ranks: int) -> list[list[int]]:
    """Split shards (indices into ``costs``, e.g. their token counts) among ``num_ranks`` ranks
    with balanced totals: whole shards, largest first, each to the least-loaded rank (ties: the
    lower shard index, the lower rank). Deterministic, so every rank computes the same split;
    each rank's shards are returned in increasing order."""
    if num_ranks < 1:
        raise BergsonError(f"--nproc_per_node {num_ranks}: must be at least 1")
    loads = [(0, r) for r in range(num_ranks)]
    heapq.heapify(loads)
    share: list[list[int]] = [[] for _ in range(num_ranks)]
    for i in sorted(range(len(costs)), key=lambda i: (-int(costs[i]), i)):
        load, r = heapq.heappop(loads)
        share[r].append(i)
        heapq.heappush(loads, (load + int(costs[i]), r))
    return [sorted(s) for s in share]


def plan_batches(lengths: np.ndarray, token_budget: int, min_length: int = 2) -> list[np.ndarray]:
    """Indices (into ``lengths``) of each batch; documents shorter than ``min_length`` are left out."""
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    current: list[int] = []
    longest = 0
    for i in order:
        n = int(lengths[i])
        if n < min_length:
            continue
        if n > token_budget:
            raise BergsonError(
                f"document {i} has {n} tokens, more than the --token_batch_size budget {token_budget}; "
                "raise the budget or pass --truncation"
            )
        if current and longest * (len(current) + 1) > token_budget:
            batches.append(np.asarray(current, dtype=np.int64))
            current = []
        if not current:
            longest = n
        current.append(int(i))
    if current:
        batches.append(np.asarray(current, dtype=np.int64))
    return batches


def pad_batch(docs: TokenizedDocs, idx: np.ndarray, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and labels; with right padding no attention mask is needed
    for a causal model, since real tokens never attend to the padding after them."""
    longest = max(len(docs.input_ids[i]) for i in idx)
    ids = np.full((len(idx), longest), pad_id, np.int64)
    labels = np.full((len(idx), longest), IGNORE, np.int64)
    for row, i in enumerate(idx):
        seq = docs.input_ids[i]
        ids[row, : len(seq)] = seq
        labels[row, : len(seq)] = np.where(docs.targets(i), seq, IGNORE)
    return torch.from_numpy(ids), torch.from_numpy(labels)
