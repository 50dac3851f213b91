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
    """Token ids per document and which positions carry the loss.

    A position is a *target* when the next-token prediction made at the previous position is
    scored. By default the targets of document i are the positions ``>= loss_start[i]`` (and
    >= 1, since the first token has no prediction); ``loss_mask`` (one boolean array per
    document) replaces that rule for chat conversations. ``weights`` multiplies each
    document's loss (the advantage of a GRPO row); None means 1.
    """

    input_ids: list[np.ndarray]
    loss_start: np.ndarray
    loss_mask: list[np.ndarray] | None = None
    weights: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self.input_ids))

    def targets(self, i: int) -> np.ndarray:
        """Boolean mask over document i's positions: True where the token is a target."""
        n = len(self.input_ids[i])
        if self.loss_mask is not None:
            mask = np.asarray(self.loss_mask[i], dtype=bool).copy()
        else:
            mask = np.zeros(n, dtype=bool)
            mask[max(int(self.loss_start[i]), 1) :] = True
        mask[:1] = False
        return mask

    def num_loss_tokens(self) -> np.ndarray:
        """Number of next-token targets per document."""
        if self.loss_mask is None:
            return np.maximum(self.lengths - np.maximum(self.loss_start, 1), 0)
        return np.fromiter((self.targets(i).sum() for i in range(len(self))), np.int64, count=len(self))

    def select(self, rows: np.ndarray | list[int]) -> TokenizedDocs:
        """The documents at ``rows``, in that order, with their masks and weights."""
        rows = np.asarray(rows, dtype=np.int64)
        return TokenizedDocs(
            [self.input_ids[i] for i in rows],
            self.loss_start[rows],
            None if self.loss_mask is None else [self.loss_mask[i] for i in rows],
            None if self.weights is None else self.weights[rows],
        )


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


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _conversation(value: Any, row: int, column: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise BergsonError(f"--conversation_column {column!r}: row {row} is not a non-empty list of messages")
    for m in value:
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise BergsonError(
                f"--conversation_column {column!r}: row {row} has a message that is not a "
                "{'role': str, 'content': str} mapping"
            )
    return value


def tokenize_conversations(ds: Any, tokenizer: Any, column: str) -> tuple[list[list[int]], list[np.ndarray]]:
    """Token ids of each rendered conversation and a mask of its assistant tokens.

    The conversation is rendered once with the tokenizer's chat template and tokenized
    without adding special tokens (the template writes its own BOS/EOS, so none is
    duplicated). An assistant turn is the text the template adds between the conversation
    before it (with the generation prompt) and the conversation including it, so its
    closing end-of-turn marker is a target while the generation prompt is not.
    """
    if column not in ds.column_names:
        raise BergsonError(
            f"--conversation_column {column!r}: no such column in the dataset; columns are "
            f"{', '.join(ds.column_names)}"
        )
    if not getattr(tokenizer, "chat_template", None):
        raise BergsonError(
            f"--conversation_column {column!r}: the tokenizer has no chat template; use a chat model's "
            "tokenizer (or set tokenizer.chat_template in Python)"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise BergsonError(
            f"--conversation_column {column!r}: assistant masks need a fast tokenizer (character offsets)"
        )
    ids_out: list[list[int]] = []
    masks: list[np.ndarray] = []
    for row, value in enumerate(ds[column]):
        conv = _conversation(value, row, column)
        text = _render(tokenizer, conv)
        spans = []
        for j, message in enumerate(conv):
            if message["role"] != "assistant":
                continue
            before = _render(tokenizer, conv[:j], generation_prompt=True) if j else ""
            upto = _render(tokenizer, conv[: j + 1])
            if not (upto.startswith(before) and text.startswith(upto)):
                raise BergsonError(
                    f"--conversation_column {column!r}: row {row}: the chat template does not render "
                    "conversations as prefixes of each other (it rewrites earlier turns), so the "
                    "assistant turns cannot be located"
                )
            spans.append((len(before), len(upto)))
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        mask = np.array(
            [any(a <= start < b for a, b in spans) for start, _ in enc["offset_mapping"]], dtype=bool
        )
        ids_out.append(list(enc["input_ids"]))
        masks.append(mask)
    return ids_out, masks


def grpo_advantages(
    prompts: list[str], rewards: list[Any], column: str = "reward"
) -> tuple[np.ndarray, np.ndarray]:
    """Dr. GRPO advantages: each reward minus the mean reward of the rows sharing its prompt
    (no division by the group's standard deviation). Returns (advantages, missing), where
    ``missing`` marks rows without a reward (None or NaN); they get advantage 0 and do not
    enter their group's mean."""
    values = np.full(len(rewards), np.nan)
    for i, r in enumerate(rewards):
        if r is None:
            continue
        if isinstance(r, bool) or not isinstance(r, (int, float, np.integer, np.floating)):
            raise BergsonError(f"--reward_column {column!r}: row {i} holds {r!r}, not a number")
        values[i] = float(r)
    missing = np.isnan(values)
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        if not missing[i]:
            groups.setdefault(prompt, []).append(i)
    adv = np.zeros(len(rewards))
    for rows in groups.values():
        adv[rows] = values[rows] - values[rows].mean()
    return adv, missing


def tokenize_documents(
    ds: Any,
    tokenizer: Any,
    cfg: DataConfig,
    max_tokens: int,
) -> TokenizedDocs:
    """Tokenize the prompt (and optional completion) column, or the conversation column.

    Documents longer than ``max_tokens`` are cut with ``cfg.truncation`` and are an error
    otherwise. Empty and one-token documents are kept (they get zero gradients) and
    reported. With ``cfg.reward_column`` each document's loss weight is its Dr. GRPO
    advantage; rows without a reward get no loss tokens (zero rows) and are counted.
    """
    limit = min(cfg.max_length, max_tokens) if cfg.max_length else max_tokens
    masks: list[np.ndarray] | None = None
    weights: np.ndarray | None = None
    if cfg.conversation_column:
        if cfg.completion_column or cfg.reward_column:
            raise BergsonError(
                "--conversation_column cannot be combined with --completion_column or --reward_column"
            )
        ids, masks = tokenize_conversations(ds, tokenizer, cfg.conversation_column)
        starts = np.zeros(len(ids), dtype=np.int64)
    else:
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
        if cfg.reward_column:
            if not cfg.completion_column:
                raise BergsonError(
                    "--reward_column needs --completion_column: rows are grouped by their prompt "
                    "and the loss is taken on the completion"
                )
            if cfg.reward_column not in ds.column_names:
                raise BergsonError(
                    f"--reward_column {cfg.reward_column!r}: no such column in the dataset; columns are "
                    f"{', '.join(ds.column_names)}"
                )
            weights, missing = grpo_advantages(prompts, ds[cfg.reward_column], cfg.reward_column)
            if missing.any():
                logger.warning(
                    "%d of %d rows have no reward in --reward_column %r; they are skipped (zero rows)",
                    int(missing.sum()),
                    len(missing),
                    cfg.reward_column,
                )
                starts = np.where(missing, [len(seq) for seq in ids], starts)

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
            if masks is not None:
                masks[i] = masks[i][:limit]
            too_long += 1
        docs.append(np.asarray(seq, dtype=np.int64))
    out = TokenizedDocs(docs, starts, masks, weights)
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
