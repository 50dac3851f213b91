"""The data options (:class:`DataConfig`, one group nested in a command's config as ``data`` or
``query``) and the checks they share across commands."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import tyro
from tyro.constructors import PrimitiveConstructorSpec

from ..errors import BergsonError
from .limits import check_limits
from .original import ORIGINAL_DEFAULTS

logger = logging.getLogger(__name__)

ChatTemplate = Literal["auto", "always", "never"]


def _parse_bool(args: list[str]) -> bool:
    if not args:
        return True
    value = args[0].lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0"):
        return False
    raise ValueError(f"expected true or false, not {args[0]!r}")


ValueBool = Annotated[
    bool,
    tyro.conf.FlagConversionOff,
    PrimitiveConstructorSpec(
        nargs=(0, 1),
        metavar="[{True,False}]",
        instance_from_str=_parse_bool,
        is_instance=lambda x: isinstance(x, bool),
        str_from_instance=lambda x: [str(x)],
    ),
]
"""A yes/no option written either as a bare flag (``--flag``: true) or with a value
(``--flag False``), as the original bergson's command line took them."""


def parse_kwargs(text: str, option: str) -> dict[str, Any]:
    """``'key=value,key2=value2'`` as keyword arguments: a value is an int, a float, true/false,
    a list when it holds ``|`` (``a|b``), and text otherwise."""

    def value(v: str) -> Any:
        if "|" in v:
            return [value(x) for x in v.split("|")]
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                pass
        return {"true": True, "false": False}.get(v.lower(), v)

    out: dict[str, Any] = {}
    for item in filter(str.strip, text.split(",")):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise BergsonError(
                f"{option} {text!r}: {item.strip()!r} is not key=value; write 'key=value,key2=value2'"
            )
        out[key] = value(raw.strip())
    return out


@dataclass
class DataConfig:
    """Which documents to read and how to turn them into token sequences."""

    dataset: str = ""
    """Hub id, local .json/.jsonl/.csv/.parquet file (optionally .gz), or save_to_disk directory."""

    split: str = "train"
    """Split to read, with optional slice syntax such as 'train[:1000]' or 'train[10%:20%]'."""

    subset: str | None = None
    """Configuration name of a hub dataset that has several."""

    data_args: str = ""
    """Further keyword arguments of datasets.load_dataset, as 'key=value,key2=value2' (a value is an int,
    a float, true/false, an a|b list, or text), e.g. 'data_dir=en' or 'delimiter=;' for a csv file."""

    prompt_column: str = "text"
    """Column holding the text (or, with --completion_column, the prompt)."""

    completion_column: str | None = None
    """Optional column holding a completion; the loss is then taken on the completion only."""

    chat_template: ChatTemplate = "auto"
    """How a prompt and its completion become one text: auto renders them with the tokenizer's chat
    template as a user and an assistant turn when it has one (as the original bergson) and joins the
    raw texts otherwise; always requires a chat template; never joins the raw texts."""

    conversation_column: str | None = None
    """Column holding chat conversations (lists of {role, content} messages), rendered with the
    tokenizer's chat template; the loss is taken on the assistant turns only."""

    reward_column: str | None = None
    """Column of rewards: each row's loss is multiplied by its Dr. GRPO advantage, the reward minus the
    mean reward of the rows with the same prompt (no std scaling). Without --completion_column the
    whole text is the completion and rows with the same text form a group, as in the original bergson."""

    skip_nan_rewards: ValueBool = False
    """With --reward_column: leave the rows whose reward is missing (NaN or empty) out of the dataset
    (store rows then count the remaining rows); without it they are kept as zero rows."""

    chunk_length: int = 0
    """Pack the --prompt_column texts into rows of exactly this many tokens: each document followed by
    the end-of-text token, all concatenated and cut into chunks (the incomplete last chunk is left
    out); one store row per chunk. 0: one row per document."""

    tokenizer: str = ""
    """Tokenizer (hub id or local directory) to tokenize the documents with, instead of the model's."""

    drop_columns: ValueBool = True
    """Keep only each row's own metadata (row id, tokens, loss); False: the dataset's other columns
    come with the rows too when a store is read as a dataset (bergson.runs.documents.store_rows)."""

    truncation: bool = False
    """Truncate documents longer than the token budget (or --max_length) instead of failing."""

    max_length: int | None = None
    """Truncation length in tokens; defaults to the token budget and the model's context size."""

    def _check(self, option: str = "--") -> None:
        """Refuse data options that contradict each other (``option``: the flags' prefix)."""
        check_limits(self, option)
        if self.chunk_length:
            names = ("completion_column", "conversation_column", "reward_column", "max_length", "truncation")
            clash = [f"{option}{name}" for name in names if getattr(self, name)]
            clash += [f"{option}drop_columns False"] if not self.drop_columns else []
            if clash:
                raise BergsonError(
                    f"{option}chunk_length {self.chunk_length} with {', '.join(clash)}: chunks are cut from "
                    f"the concatenated {option}prompt_column texts (a chunk is no dataset row), with the loss "
                    "on every token and no truncation; drop one of them"
                )
        if self.skip_nan_rewards and not self.reward_column:
            raise BergsonError(
                f"{option}skip_nan_rewards: it leaves out rows without a reward, and no {option}reward_column "
                "is given; give one, or drop the option"
            )
        if self.chat_template != "auto" and not self.completion_column:
            raise BergsonError(
                f"{option}chat_template {self.chat_template}: it says how a prompt and its completion are "
                f"joined, and no {option}completion_column is given; give one, or drop the option"
            )
        parse_kwargs(self.data_args, f"{option}data_args")

    @classmethod
    def from_manifest(cls, data: dict[str, Any]) -> DataConfig:
        """The data options recorded in a store's manifest (its other data fields left out). A
        store written before --chat_template existed joined prompts and completions as raw text."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if known.get("completion_column"):
            known.setdefault("chat_template", "never")
        return cls(**known)


def check_dataset(data: DataConfig, option: str = "--dataset") -> None:
    """Refuse a run without documents before anything is loaded."""
    if not data.dataset:
        original = ORIGINAL_DEFAULTS["dataset"].original if option == "--dataset" else None
        hint = f" (the original bergson read {original} when none was given)" if original else ""
        raise BergsonError(
            f"{option} is required: the documents to compute gradients of, as a hub id, a local "
            f".json/.jsonl/.csv/.parquet file or a save_to_disk directory{hint}; e.g. {option} NeelNanda/pile-10k"
        )


def share_tokenizer(data: DataConfig, query: DataConfig, option: str = "--query") -> None:
    """Tokenize the query documents with the training documents' --tokenizer (a query tokenized
    otherwise would not be comparable); a different --query.tokenizer is refused."""
    if data.tokenizer and query.tokenizer and query.tokenizer != data.tokenizer:
        raise BergsonError(
            f"--tokenizer {data.tokenizer} and {option}.tokenizer {query.tokenizer}: the query and the "
            "training documents must be tokenized alike; give one tokenizer"
        )
    if data.tokenizer and not query.tokenizer:
        logger.info("the query documents are tokenized with --tokenizer %s too", data.tokenizer)
        query.tokenizer = data.tokenizer
