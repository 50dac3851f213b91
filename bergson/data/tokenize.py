"""Turn dataset rows into token sequences with the positions that carry loss."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import DataConfig
from ..errors import BergsonError

logger = logging.getLogger(__name__)


@dataclass
class TokenizedDocs:
    """Token ids per document and, per document, the first position whose token is a target.

    The loss of a document is taken on the next-token predictions of tokens at positions
    ``>= loss_start`` (and >= 1, since the first token has no prediction).
    """

    input_ids: list[np.ndarray]
    loss_start: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self.input_ids))

    def num_loss_tokens(self) -> np.ndarray:
        """Number of next-token targets per document."""
        return np.maximum(self.lengths - np.maximum(self.loss_start, 1), 0)


def _texts(ds: Any, column: str, option: str) -> list[str]:
    if column not in ds.column_names:
        raise BergsonError(
            f"{option} {column!r}: no such column in the dataset; columns are {', '.join(ds.column_names)}"
        )
    values = ds[column]
    out: list[str] = []
    for i, v in enumerate(values):
        if v is None:
            out.append("")
        elif isinstance(v, str):
            out.append(v)
        else:
            raise BergsonError(f"{option} {column!r}: row {i} holds a {type(v).__name__}, not text")
    return out


def tokenize_documents(
    ds: Any,
    tokenizer: Any,
    cfg: DataConfig,
    max_tokens: int,
) -> TokenizedDocs:
    """Tokenize the prompt (and optional completion) column.

    Documents longer than ``max_tokens`` are cut with ``cfg.truncation`` and are an error
    otherwise. Empty and one-token documents are kept (they get zero gradients) and
    reported.
    """
    limit = min(cfg.max_length, max_tokens) if cfg.max_length else max_tokens
    prompts = _texts(ds, cfg.prompt_column, "--prompt_column")
    enc = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    if cfg.completion_column:
        comps = _texts(ds, cfg.completion_column, "--completion_column")
        comp_ids = tokenizer(comps, add_special_tokens=False)["input_ids"]
        starts = np.fromiter((len(p) for p in enc), dtype=np.int64, count=len(enc))
        ids = [p + c for p, c in zip(enc, comp_ids)]
    else:
        starts = np.zeros(len(enc), dtype=np.int64)
        ids = enc

    docs: list[np.ndarray] = []
    too_long = 0
    for i, seq in enumerate(ids):
        if len(seq) > limit:
            if not cfg.truncation:
                raise BergsonError(
                    f"document at row {i} has {len(seq)} tokens, more than the limit of {limit} "
                    "(the token budget --token_batch_size, --max_length, or the model's context size); "
                    "pass --truncation to cut long documents, or raise --token_batch_size"
                )
            seq = seq[:limit]
            too_long += 1
        docs.append(np.asarray(seq, dtype=np.int64))
    out = TokenizedDocs(docs, starts)
    if too_long:
        logger.info("truncated %d documents to %d tokens", too_long, limit)
    trivial = int((out.num_loss_tokens() == 0).sum())
    if trivial:
        logger.warning(
            "%d of %d documents have no next-token target (empty, one token, or an empty "
            "completion); they are kept as rows with zero gradients and zero loss",
            trivial,
            len(out),
        )
    return out
