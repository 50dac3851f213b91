"""Turn dataset rows into token sequences with the positions that carry loss."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from ..config import DataConfig
from ..errors import BergsonError
from .chunks import chunk_token_ids
from .load import drop_missing_rewards

logger = logging.getLogger(__name__)


@dataclass
class TokenizedDocs:
    """Token ids per document and which positions carry the loss.

    A position is a *target* when the next-token prediction made at the previous position is
    scored. By default the targets of document i are the positions ``>= loss_start[i]`` (and
    >= 1, since the first token has no prediction); ``loss_mask`` (one boolean array per
    document) replaces that rule for chat conversations. ``weights`` multiplies each
    document's loss (the advantage of a GRPO row); None means 1. ``info`` says how the rows were
    made (recorded in a store's manifest): how prompts and completions were joined, chunking.
    """

    input_ids: list[np.ndarray]
    loss_start: np.ndarray
    loss_mask: list[np.ndarray] | None = None
    weights: np.ndarray | None = None

    def __post_init__(self) -> None:
        # not a field: the fields are per-document, and this describes them all
        self.info: dict[str, Any] = {}

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
        out = TokenizedDocs(
            [self.input_ids[i] for i in rows],
            self.loss_start[rows],
            None if self.loss_mask is None else [self.loss_mask[i] for i in rows],
            None if self.weights is None else self.weights[rows],
        )
        out.info.update(self.info)
        return out


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


def _check_chat_tokenizer(tokenizer: Any, option: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise BergsonError(
            f"{option}: the tokenizer has no chat template; use a chat model's tokenizer (or set "
            "tokenizer.chat_template in Python)"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise BergsonError(f"{option}: assistant masks need a fast tokenizer (character offsets)")


def render_conversations(
    convs: list[list[dict[str, Any]]], tokenizer: Any, option: str
) -> tuple[list[list[int]], list[np.ndarray]]:
    """Token ids of each conversation rendered with the chat template, and a mask of its
    assistant tokens.

    The conversation is rendered once and tokenized without adding special tokens (the
    template writes its own BOS/EOS, so none is duplicated). An assistant turn is the text the
    template adds between the conversation before it (with the generation prompt) and the
    conversation including it, so its closing end-of-turn marker is a target while the
    generation prompt is not.
    """
    ids_out: list[list[int]] = []
    masks: list[np.ndarray] = []
    for row, conv in enumerate(convs):
        text = _render(tokenizer, conv)
        spans = []
        for j, message in enumerate(conv):
            if message["role"] != "assistant":
                continue
            before = _render(tokenizer, conv[:j], generation_prompt=True) if j else ""
            upto = _render(tokenizer, conv[: j + 1])
            if not (upto.startswith(before) and text.startswith(upto)):
                raise BergsonError(
                    f"{option}: row {row}: the chat template does not render conversations as prefixes "
                    "of each other (it rewrites earlier turns), so the assistant turns cannot be located"
                )
            spans.append((len(before), len(upto)))
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        mask = np.array(
            [any(a <= start < b for a, b in spans) for start, _ in enc["offset_mapping"]], dtype=bool
        )
        ids_out.append(list(enc["input_ids"]))
        masks.append(mask)
    return ids_out, masks


def tokenize_conversations(ds: Any, tokenizer: Any, column: str) -> tuple[list[list[int]], list[np.ndarray]]:
    """Token ids of each conversation of ``column`` and a mask of its assistant tokens
    (:func:`render_conversations`)."""
    option = f"--conversation_column {column!r}"
    if column not in ds.column_names:
        raise BergsonError(
            f"{option}: no such column in the dataset; columns are {', '.join(ds.column_names)}"
        )
    _check_chat_tokenizer(tokenizer, option)
    convs = [_conversation(value, row, column) for row, value in enumerate(ds[column])]
    return render_conversations(convs, tokenizer, option)


def pair_format(tokenizer: Any, cfg: DataConfig) -> str:
    """How prompt/completion pairs are joined under ``cfg.chat_template``: 'chat_template' (a user
    and an assistant turn) or 'plain' (the raw texts, the prompt with the tokenizer's special tokens)."""
    if cfg.chat_template == "never":
        return "plain"
    if cfg.chat_template == "always":
        _check_chat_tokenizer(tokenizer, "--chat_template always")
        return "chat_template"
    has = bool(getattr(tokenizer, "chat_template", None)) and bool(getattr(tokenizer, "is_fast", False))
    return "chat_template" if has else "plain"


@lru_cache(maxsize=4)
def _load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise BergsonError(f"--tokenizer {name}: cannot load a tokenizer from it ({e})") from e


def document_tokenizer(cfg: DataConfig, tokenizer: Any) -> Any:
    """The tokenizer of ``cfg.tokenizer`` when one is named (loaded once), else ``tokenizer``."""
    return _load_tokenizer(cfg.tokenizer) if cfg.tokenizer else tokenizer


def grpo_advantages(
    prompts: list[str], rewards: list[Any], column: str = "reward"
) -> tuple[np.ndarray, np.ndarray]:
    """Dr. GRPO advantages: each reward minus the mean reward of the rows sharing its prompt
    (no division by the group's standard deviation). Returns (advantages, missing), where
    ``missing`` marks rows without a reward (None or NaN); they get advantage 0 and do not
    enter their group's mean. A row alone in its group has advantage 0 (and a zero gradient);
    how many are alone is announced."""
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
    alone = sum(len(rows) == 1 for rows in groups.values())
    if alone:
        logger.warning(
            "--reward_column %r: %d of %d rows share their prompt (or, without --completion_column, their "
            "text) with no other row; a group of one has advantage 0, so those rows have zero gradients",
            column, alone, len(rewards),
        )  # fmt: skip
    return adv, missing


def _pairs(
    ds: Any, tokenizer: Any, cfg: DataConfig, prompts: list[str]
) -> tuple[list, np.ndarray, Any, dict]:
    """Prompt/completion rows: (token ids, loss starts, masks or None, info)."""
    comps = _texts(ds, cfg.completion_column, "--completion_column")  # type: ignore[arg-type]
    form = pair_format(tokenizer, cfg)
    if form == "chat_template":
        convs = [
            [{"role": "user", "content": p}, {"role": "assistant", "content": c}]
            for p, c in zip(prompts, comps)
        ]
        ids, masks = render_conversations(convs, tokenizer, f"--chat_template {cfg.chat_template}")
        starts = np.zeros(len(ids), dtype=np.int64)
        logger.info(
            "prompt/completion pairs rendered with the tokenizer's chat template as a user and an assistant "
            "turn (loss on the assistant turn; --chat_template never joins the raw texts)"
        )
    else:
        enc = tokenizer(prompts, add_special_tokens=True)["input_ids"]
        comp_ids = tokenizer(comps, add_special_tokens=False)["input_ids"]
        starts = np.fromiter((len(p) for p in enc), dtype=np.int64, count=len(enc))
        ids, masks = [p + c for p, c in zip(enc, comp_ids)], None
        why = (
            "--chat_template never" if cfg.chat_template == "never" else "the tokenizer has no chat template"
        )
        logger.info("prompt/completion pairs joined as raw text (%s; loss on the completion)", why)
    return ids, starts, masks, {"pair_format": form}


def tokenize_documents(
    ds: Any,
    tokenizer: Any,
    cfg: DataConfig,
    max_tokens: int,
) -> TokenizedDocs:
    """Tokenize the prompt (and optional completion) column, or the conversation column, or
    pack the prompt column into chunks of ``cfg.chunk_length`` tokens.

    Documents longer than ``max_tokens`` are cut with ``cfg.truncation`` and are an error
    otherwise. Empty and one-token documents are kept (they get zero gradients) and
    reported. With ``cfg.reward_column`` each document's loss weight is its Dr. GRPO
    advantage; rows without a reward get no loss tokens (zero rows) and are counted.
    ``cfg.tokenizer`` names a tokenizer to use instead of ``tokenizer``.
    """
    cfg._check()
    tokenizer = document_tokenizer(cfg, tokenizer)
    ds, left_out = drop_missing_rewards(ds, cfg)
    limit = min(cfg.max_length, max_tokens) if cfg.max_length else max_tokens
    masks: list[np.ndarray] | None = None
    weights: np.ndarray | None = None
    info: dict[str, Any] = {"rows_without_reward_left_out": left_out} if left_out else {}
    if not cfg.drop_columns:
        info["columns"] = list(ds.column_names)
    if cfg.chunk_length:
        if cfg.chunk_length > limit:
            raise BergsonError(
                f"--chunk_length {cfg.chunk_length}: longer than the limit of {limit} tokens (the token budget "
                "--token_batch_size or the model's context size); lower it or raise --token_batch_size"
            )
        chunks, info = chunk_token_ids(
            _texts(ds, cfg.prompt_column, "--prompt_column"), tokenizer, cfg.chunk_length
        )
        out = TokenizedDocs(chunks, np.zeros(len(chunks), dtype=np.int64))
        out.info.update(info)
        return out
    if cfg.conversation_column:
        if cfg.completion_column or cfg.reward_column:
            raise BergsonError(
                "--conversation_column cannot be combined with --completion_column or --reward_column"
            )
        ids, masks = tokenize_conversations(ds, tokenizer, cfg.conversation_column)
        starts = np.zeros(len(ids), dtype=np.int64)
    else:
        prompts = _texts(ds, cfg.prompt_column, "--prompt_column")
        if cfg.completion_column:
            ids, starts, masks, pairs = _pairs(ds, tokenizer, cfg, prompts)
            info.update(pairs)
        else:
            ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
            starts = np.zeros(len(ids), dtype=np.int64)
        if cfg.reward_column:
            if cfg.reward_column not in ds.column_names:
                raise BergsonError(
                    f"--reward_column {cfg.reward_column!r}: no such column in the dataset; columns are "
                    f"{', '.join(ds.column_names)}"
                )
            weights, missing = grpo_advantages(prompts, ds[cfg.reward_column], cfg.reward_column)
            if missing.any():
                logger.warning(
                    "%d of %d rows have no reward in --reward_column %r; they are kept as zero rows "
                    "(--skip_nan_rewards leaves them out)",
                    int(missing.sum()), len(missing), cfg.reward_column,
                )  # fmt: skip
                starts = np.where(missing, [len(seq) for seq in ids], starts)
                if masks is not None:
                    masks = [m & ~miss for m, miss in zip(masks, missing)]

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
    out.info.update(info)
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
