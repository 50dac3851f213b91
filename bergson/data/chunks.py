"""Packing documents into rows of a fixed number of tokens (``--chunk_length``).

Each document is tokenized without special tokens and followed by the end-of-text token; the
documents are concatenated in dataset order and the stream is cut into chunks of exactly
``chunk_length`` tokens. The tokens after the last complete chunk are left out (no padding),
and so are empty documents; both are announced. Every token of a chunk after its first is a
next-token target, across document boundaries.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..errors import BergsonError

logger = logging.getLogger(__name__)


def chunk_token_ids(
    texts: list[str], tokenizer: Any, chunk_length: int
) -> tuple[list[np.ndarray], dict[str, int]]:
    """The chunks of ``texts`` and what they hold (counts recorded in a store's manifest)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise BergsonError(
            f"--chunk_length {chunk_length}: the tokenizer has no end-of-text token to separate the documents; "
            "use a tokenizer that has one (--tokenizer), or drop the option"
        )
    kept = [t for t in texts if t.strip()]
    encoded = tokenizer(kept, add_special_tokens=False)["input_ids"] if kept else []
    stream = np.fromiter(
        (tok for ids in encoded for tok in (*ids, eos)),
        dtype=np.int64,
        count=sum(len(ids) + 1 for ids in encoded),
    )
    num = len(stream) // chunk_length
    chunks = [stream[i * chunk_length : (i + 1) * chunk_length].copy() for i in range(num)]
    info = {
        "chunk_length": chunk_length,
        "chunks": num,
        "source_documents": len(kept),
        "empty_documents_left_out": len(texts) - len(kept),
        "tokens_left_out": int(len(stream) - num * chunk_length),
    }
    if info["empty_documents_left_out"]:
        logger.warning("--chunk_length: %d empty documents left out", info["empty_documents_left_out"])
    if num == 0:
        raise BergsonError(
            f"--chunk_length {chunk_length}: the {len(kept)} documents hold {len(stream)} tokens (with one "
            "end-of-text token each), less than one chunk; lower --chunk_length or give more documents"
        )
    logger.info(
        "--chunk_length %d: %d documents (%d tokens with their end-of-text tokens) packed into %d chunks; "
        "the last %d tokens fill no chunk and are left out",
        chunk_length, len(kept), len(stream), num, info["tokens_left_out"],
    )  # fmt: skip
    return chunks, info
