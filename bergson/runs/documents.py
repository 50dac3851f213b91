"""The documents of a run: the batch token budget (capped at the model's context size), loading
and tokenizing a dataset, seeded subsamples, the fingerprint of the tokens a store records, and
:func:`prepare_inputs` (options checked, model loaded, dataset tokenized) that opens most commands."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np
import torch

from ..config import DataConfig
from ..config.commands import command_of
from ..config.options import BatchOptions, validate_options
from ..config.original import announce_differing_defaults
from ..data import TokenizedDocs, load_data, tokenize_documents
from ..data.load import load_rows
from ..errors import BergsonError
from ..models import load_model

logger = logging.getLogger(__name__)
_SAID: set[str] = set()


def validate_index_config(cfg: Any) -> None:
    """Refuse a config without a run path or with values its option groups do not accept; a run
    that computes gradients says which of our defaults it uses differ from the original bergson's."""
    if not cfg.run_path:
        raise BergsonError("run_path is required: the output directory of the store")
    validate_options(cfg)
    if not getattr(cfg, "index", None):
        announce_differing_defaults(cfg, command_of(cfg))


def context_size(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def token_budget(cfg: BatchOptions, model: torch.nn.Module) -> int:
    """The batch token budget, capped at the model's context size. ``--token_batch_size auto`` is
    resolved here, once the model is on its device (:mod:`bergson.collect.budget`): ``cfg`` then
    holds the chosen number, and the record of the choice (``cfg._token_batch_size_auto``) goes
    into the manifest."""
    ctx = context_size(model)
    if isinstance(cfg.token_batch_size, str):
        from ..collect.budget import auto_token_budget, is_auto

        if not is_auto(cfg.token_batch_size):
            raise BergsonError(
                f"--token_batch_size {cfg.token_batch_size!r}: give a number of tokens or 'auto'"
            )
        budget, record = auto_token_budget(
            model,
            projection_dim=getattr(cfg, "projection_dim", 16),
            context=ctx,
        )
        cfg.token_batch_size = budget
        object.__setattr__(cfg, "_token_batch_size_auto", record)
    elif (hint := default_budget_hint(cfg, next(model.parameters()).device.type)) and hint not in _SAID:
        _SAID.add(hint)  # once a process: some commands size several passes
        logger.info(hint)
    budget = int(cfg.token_batch_size)
    return min(budget, ctx) if ctx else budget


def default_budget_hint(cfg: BatchOptions, device_type: str) -> str | None:
    """On a GPU, a run left at the default token budget is told that ``auto`` is much faster there
    (the budget is kept: ``auto`` changes the batches, and so the rounding of every row)."""
    default = BatchOptions.__dataclass_fields__["token_batch_size"].default
    if device_type != "cuda" or cfg.token_batch_size != default:
        return None
    return (
        f"--token_batch_size {default} (the default) on a GPU: --token_batch_size auto picks the largest "
        "budget that fits the device, and builds several times faster there (7.1x for a 160M-parameter "
        "model on an H200; docs/benchmarks/performance.md, 'On a GPU')"
    )


def tokens_fingerprint(docs: TokenizedDocs) -> str:
    h = hashlib.sha256()
    for i, (seq, start) in enumerate(zip(docs.input_ids, docs.loss_start)):
        h.update(np.int64(len(seq)).tobytes())
        h.update(np.int64(start).tobytes())
        h.update(seq.tobytes())
        if docs.loss_mask is not None:
            h.update(docs.targets(i).tobytes())
    if docs.weights is not None:
        h.update(np.asarray(docs.weights, np.float64).tobytes())
    return h.hexdigest()


def load_docs(data: DataConfig, tokenizer: Any, max_tokens: int, option: str = "--dataset") -> TokenizedDocs:
    """Load and tokenize a dataset; an empty one is an error naming ``option``."""
    report: dict[str, Any] = {}
    ds = load_rows(data, option=option, report=report)  # a small plain local file without `datasets`
    docs = tokenize_documents(ds, tokenizer, data, max_tokens)
    docs.info.update(report)
    if len(docs) == 0:
        raise BergsonError(f"{option} {data.dataset} (split {data.split!r}) has no rows")
    return docs


def prepare_inputs(cfg: Any) -> tuple[torch.nn.Module, Any, TokenizedDocs, int]:
    """Validate the options (a config with the model, data and batch groups), load the model and tokenize the dataset: (model, tokenizer, docs, max_tokens)."""
    validate_index_config(cfg)
    model, tokenizer = load_model(cfg)
    max_tokens = token_budget(cfg, model)
    return model, tokenizer, load_docs(cfg.data, tokenizer, max_tokens), max_tokens


def subsample(docs: TokenizedDocs, max_documents: int | None, seed: int) -> tuple[TokenizedDocs, np.ndarray]:
    """A seeded random sample of documents (all of them when max_documents is None or 0), in order."""
    if not max_documents or max_documents >= len(docs):
        return docs, np.arange(len(docs))
    if max_documents < 0:
        raise BergsonError(f"sample size {max_documents}: must be positive")
    idx = np.sort(np.random.default_rng(seed).choice(len(docs), max_documents, replace=False))
    return docs.select(idx), idx


def store_rows(store: Any) -> Any:
    """A store's rows as a ``datasets.Dataset``: ``row_id``, ``num_tokens`` and ``loss`` of each
    row, and, for a store built with ``--drop_columns False``, the dataset's own columns of the
    row (read again from the dataset its manifest records, with the same options)."""
    import datasets

    from ..store import load_gradients

    if not hasattr(store, "rows"):
        store = load_gradients(store)
    rows = store.rows
    out = {name: np.asarray(rows[name]) for name in ("row_id", "num_tokens", "loss")}
    data = store.manifest.data
    columns = data.get("columns") if data.get("drop_columns") is False else None
    if columns:
        ds = load_data(DataConfig.from_manifest(data), option="the store's dataset")
        missing = [c for c in columns if c not in ds.column_names]
        if missing or len(ds) != data.get("num_documents", len(ds)):
            raise BergsonError(
                f"the dataset {data.get('dataset')} no longer has the rows the store at {store.root} was built "
                f"from (columns {missing} missing, or {len(ds)} rows instead of {data.get('num_documents')})"
            )
        picked = ds.select([int(r) for r in out["row_id"]])
        for c in columns:
            if c not in out:
                out[c] = picked[c]
    return datasets.Dataset.from_dict(out)
