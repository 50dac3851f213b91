"""``bergson test_model_configuration``: are a model's batched gradients its one-by-one gradients?

Per-example gradients are only meaningful if a document's vector does not depend on which
other documents share its batch. Attention kernels (flash, memory-efficient), reduced
precision and TF32 matmuls pick different reduction orders for different batch shapes, so
a document batched with others can get a (slightly) different gradient than alone.

The check collects projected gradients of a few documents with the library's own
collection loop and compares, per document, the vector computed

(a) alone (a batch of one) with
(b) the same document in one right-padded batch of documents of mixed lengths, and
(c) the document cut to the length of the shortest one, alone and in one batch of such
    equal-length documents (no padding: only the batch size differs).

The error of a document is ``||v_batched - v_alone|| / ||v_alone||``; a setting is
consistent when the largest error of (b) and of (c) is within ``--tolerance``. Settings
are tried in order of cost, each reloading the model, until one is consistent:

1. as configured (``--precision``, ``--force_math_sdp``, ``--use_tf32_matmuls``);
2. plus the math attention kernel (``--force_math_sdp``);
3. plus fp32 weights with TF32 matmuls (CUDA only);
4. full fp32 with the math attention kernel (no TF32).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .collect.loop import InMemorySink, collect_gradients
from .config import ModelConfigTestConfig, ModelOptions
from .core.devices import resolve_device
from .data import TokenizedDocs, load_data, tokenize_documents
from .errors import BergsonError
from .models import find_tracked_modules, load_model, numerics, resolve_dtype

logger = logging.getLogger(__name__)

Loader = Callable[[ModelOptions], tuple[nn.Module, Any]]
"""Loads the model and tokenizer for a setting's options (``bergson.models.load_model``)."""

DEFAULT_MAX_LENGTH = 256

SENTENCES = (
    "The cat sat quietly on the warm windowsill.",
    "Rain is expected across the northern hills tomorrow afternoon, with clearer skies by the evening.",
    "She opened the old wooden box and found a bundle of letters tied with a faded blue ribbon.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "After years of careful study, the team finally published a short paper describing how small "
    "changes in soil moisture can shift the timing of spring flowering in alpine meadows.",
    "Please remember to lock the door when you leave.",
    "The library closes early on Sundays, so students often gather in the cafe across the street to "
    "finish their reading, share notes and argue about the questions that will come up in the exam.",
    "A good map shows only what the traveller needs.",
)


@dataclasses.dataclass(frozen=True)
class Setting:
    """The numerics options of one attempt."""

    name: str
    precision: str
    force_math_sdp: bool
    use_tf32_matmuls: bool
    cuda_only: bool = False

    def options(self, cfg: ModelOptions) -> ModelOptions:
        return dataclasses.replace(
            cfg,
            precision=self.precision,  # type: ignore[arg-type]
            force_math_sdp=self.force_math_sdp,
            use_tf32_matmuls=self.use_tf32_matmuls,
        )


def escalation(cfg: ModelOptions) -> list[Setting]:
    """The settings tried, in order: as configured, + math SDPA, + fp32 with TF32, full fp32."""
    return [
        Setting("as configured", cfg.precision, cfg.force_math_sdp, cfg.use_tf32_matmuls),
        Setting("+ math SDPA", cfg.precision, True, cfg.use_tf32_matmuls),
        Setting("+ fp32, TF32 matmuls", "fp32", True, True, cuda_only=True),
        Setting("full fp32 + math SDPA", "fp32", True, False),
    ]


def flags_for(setting: Setting, cfg: ModelOptions) -> list[str]:
    """The command-line flags that turn ``cfg`` into ``setting``."""
    flags = []
    if setting.force_math_sdp and not cfg.force_math_sdp:
        flags.append("--force_math_sdp")
    if setting.precision != cfg.precision:
        flags += ["--precision", setting.precision]
    if setting.use_tf32_matmuls != cfg.use_tf32_matmuls:
        flags.append("--use_tf32_matmuls" if setting.use_tf32_matmuls else "--no_use_tf32_matmuls")
    return flags


def _validate(cfg: ModelConfigTestConfig) -> None:
    if cfg.num_documents < 2:
        raise BergsonError(
            f"--num_documents {cfg.num_documents}: must be at least 2 (documents are compared "
            "alone and batched together)"
        )
    if cfg.projection_dim < 0:
        raise BergsonError(f"--projection_dim {cfg.projection_dim}: must be 0 (full gradients) or positive")
    if not (cfg.tolerance > 0 and math.isfinite(cfg.tolerance)):
        raise BergsonError(f"--tolerance {cfg.tolerance}: must be a positive number such as 1e-3")
    if cfg.data.max_length is not None and cfg.data.max_length < 2:
        raise BergsonError(f"--data.max_length {cfg.data.max_length}: must be at least 2")


def _select(docs: TokenizedDocs, rows: Sequence[int]) -> TokenizedDocs:
    """The documents at ``rows`` (every per-document field of TokenizedDocs follows)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(docs):
        v = getattr(docs, f.name)
        if v is None:
            values[f.name] = None
        elif isinstance(v, np.ndarray):
            values[f.name] = v[np.asarray(rows, dtype=np.int64)]
        else:
            values[f.name] = [v[i] for i in rows]
    return type(docs)(**values)


def _truncate(docs: TokenizedDocs, lengths: int | Sequence[int]) -> TokenizedDocs:
    """Document i cut to its first ``lengths[i]`` tokens (per-token fields cut alike)."""
    if isinstance(lengths, int):
        lengths = [lengths] * len(docs)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(docs):
        v = getattr(docs, f.name)
        values[f.name] = [x[:n] for x, n in zip(v, lengths)] if isinstance(v, list) else v
    return type(docs)(**values)


def _strict_json(value: Any) -> Any:
    """The report with non-finite numbers (an infinite relative error) written as null."""
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def load_test_documents(cfg: ModelConfigTestConfig, tokenizer: Any, model: nn.Module) -> TokenizedDocs:
    """The first ``num_documents`` documents with a next-token target, cut to ``max_length`` tokens.

    Documents cut at the limit are cut to staggered lengths (limit, limit - s, limit - 2s, ...
    down to about half the limit) so that the padded batch always mixes lengths.
    """
    limit = cfg.data.max_length or DEFAULT_MAX_LENGTH
    from .runs.documents import context_size

    ctx = context_size(model)
    if ctx:
        limit = min(limit, ctx)
    data = dataclasses.replace(cfg.data, truncation=True, max_length=limit)
    if cfg.data.dataset:
        ds = load_data(data, option="--data.dataset")
        ds = ds.select(range(min(len(ds), 4 * cfg.num_documents)))
    else:
        import datasets

        data = dataclasses.replace(data, prompt_column="text", completion_column=None)
        ds = datasets.Dataset.from_dict({"text": list(SENTENCES)})
    docs = tokenize_documents(ds, tokenizer, data, limit)
    usable = [i for i in range(len(docs)) if docs.num_loss_tokens()[i] > 0]
    if len(usable) < 2:
        where = f"--data.dataset {cfg.data.dataset}" if cfg.data.dataset else "the built-in sentences"
        raise BergsonError(f"{where}: fewer than 2 documents with a next-token target; pass more text")
    if not cfg.data.dataset and cfg.num_documents > len(usable):
        logger.info("using all %d built-in sentences (--num_documents %d)", len(usable), cfg.num_documents)
    docs = _select(docs, usable[: cfg.num_documents])
    step = max(1, limit // (2 * len(docs)))
    at_limit = np.cumsum(docs.lengths >= limit) - 1
    cut = [limit - int(k) * step if n >= limit else int(n) for n, k in zip(docs.lengths, at_limit)]
    return _truncate(docs, cut)


def _rel_errors(alone: np.ndarray, batched: np.ndarray) -> np.ndarray:
    """Per row ||batched - alone|| / ||alone|| (0 when both are zero, inf when only alone is)."""
    num = np.linalg.norm(batched - alone, axis=1)
    den = np.linalg.norm(alone, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        err = num / den
    return np.where(den > 0, err, np.where(num > 0, np.inf, 0.0))


@dataclasses.dataclass
class DocumentVectors:
    """Every document's gradient vector in the four situations the check compares (rows in
    document order): ``alone`` (a batch of one), ``padded`` (the right-padded mixed-length batch),
    ``equal_alone`` (cut to ``common_length`` tokens, a batch of one) and ``equal`` (cut, in the
    batch of equal-length documents). ``dims`` is the column width of each tracked block."""

    alone: np.ndarray
    padded: np.ndarray
    equal_alone: np.ndarray
    equal: np.ndarray
    common_length: int
    dims: dict[str, int]


def _concat(parts: Sequence[TokenizedDocs]) -> TokenizedDocs:
    """The documents of ``parts`` one after the other (every per-document field follows)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(parts[0]):
        vs = [getattr(d, f.name) for d in parts]
        if all(v is None for v in vs):
            values[f.name] = None
        elif isinstance(vs[0], np.ndarray):
            values[f.name] = np.concatenate(vs)
        else:
            values[f.name] = [x for v in vs for x in v]
    return type(parts[0])(**values)


def document_vectors(
    model: nn.Module,
    docs: TokenizedDocs,
    *,
    modules: Sequence[str] = (),
    projection_dim: int = 16,
    pad_token_id: int = 0,
    track_experts: bool = False,
) -> DocumentVectors:
    """Collect the vectors the check compares, in two passes of the collection loop.

    The loop packs each shard of documents into batches on its own, so the two batches run as
    the two shards of one pass (the documents, then the documents cut to the common length,
    each shard within one batch's token budget), and the documents alone as shards of one
    document in another. A document already at the common length is its own cut: its vector
    alone is computed once and serves both comparisons. The batches are exactly those of a
    ``collect_gradients`` call per situation, so the vectors are too.
    """
    tracked = find_tracked_modules(model, modules, track_experts=track_experts)
    n = len(docs)
    common = int(docs.lengths.min())
    equal = _truncate(docs, common)
    longer = [int(i) for i in np.flatnonzero(docs.lengths > common)]

    def collect(d: TokenizedDocs, shard_size: int) -> InMemorySink:
        sink = collect_gradients(
            model,
            d,
            modules=tracked,
            projection_dim=projection_dim,
            token_batch_size=max(2, int(d.lengths.max()) * shard_size),  # a shard is one batch
            shard_size=shard_size,
            pad_token_id=pad_token_id,
            progress=False,
        )
        assert isinstance(sink, InMemorySink)
        return sink

    batched = collect(_concat([docs, equal]), n)
    alone = collect(_concat([docs, _select(equal, longer)]), 1).vectors
    equal_alone = alone[:n].copy()
    equal_alone[longer] = alone[n:]
    return DocumentVectors(
        alone=alone[:n],
        padded=batched.vectors[:n],
        equal_alone=equal_alone,
        equal=batched.vectors[n:],
        common_length=common,
        dims=batched.dims,
    )


def measure(model: nn.Module, docs: TokenizedDocs, **options: Any) -> dict[str, Any]:
    """Relative errors of batched against one-by-one gradient vectors, per document, from the
    vectors :func:`document_vectors` collects with ``options`` (its keyword arguments).

    Returns the per-document errors of the right-padded mixed-length batch ('padded') and
    of the equal-length batch ('equal_length'), their maxima, the common length and the
    module whose own vectors disagree the most.
    """
    v = document_vectors(model, docs, **options)
    pairs = {"padded": (v.alone, v.padded), "equal_length": (v.equal_alone, v.equal)}
    out: dict[str, Any] = {"common_length": v.common_length, "blocks": len(v.dims)}
    worst_module, worst = None, -1.0
    for key, (alone, batched) in pairs.items():
        err = _rel_errors(alone, batched)
        out[f"{key}_rel_errors"] = [float(e) for e in err]
        out[f"{key}_max_rel_error"] = float(err.max())
        start = 0
        for name, dim in v.dims.items():
            e = float(_rel_errors(alone[:, start : start + dim], batched[:, start : start + dim]).max())
            if e > worst:
                worst_module, worst = name, e
            start += dim
    out["worst_module"] = worst_module
    out["worst_module_rel_error"] = worst
    return out


def _key(setting: Setting, device: torch.device) -> tuple[Any, ...]:
    """Settings with equal keys run the same numerics (TF32 only matters on CUDA)."""
    return (
        resolve_dtype(setting.precision, device),
        setting.force_math_sdp,
        setting.use_tf32_matmuls and device.type == "cuda",
    )


def check_model_configuration(cfg: ModelConfigTestConfig, loader: Loader = load_model) -> dict[str, Any]:
    """Run the escalation with ``loader`` (called once per tested setting) and return the report."""
    _validate(cfg)
    device = resolve_device(cfg.device)
    report: dict[str, Any] = {
        "model": cfg.model,
        "device": str(device),
        "tolerance": cfg.tolerance,
        "projection_dim": cfg.projection_dim,
        "settings": [],
    }
    docs: TokenizedDocs | None = None
    tried: dict[tuple[Any, ...], str] = {}
    chosen: Setting | None = None
    for setting in escalation(cfg):
        entry: dict[str, Any] = {
            "name": setting.name,
            "precision": setting.precision,
            "force_math_sdp": setting.force_math_sdp,
            "use_tf32_matmuls": setting.use_tf32_matmuls,
        }
        report["settings"].append(entry)
        key = _key(setting, device)
        if setting.cuda_only and device.type != "cuda":
            entry.update(status="skipped", note="TF32 applies to CUDA matmuls only")
            continue
        if key in tried:
            entry.update(status="skipped", note=f"same numerics as '{tried[key]}'")
            continue
        tried[key] = setting.name
        opts = setting.options(cfg)
        model, tokenizer = loader(opts)
        entry["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
        if docs is None:
            docs = load_test_documents(cfg, tokenizer, model)
            report["num_documents"] = len(docs)
            report["lengths"] = [int(n) for n in docs.lengths]
        pad = getattr(tokenizer, "pad_token_id", None) or 0
        with numerics(opts):
            result = measure(
                model,
                docs,
                modules=cfg.modules,
                projection_dim=cfg.projection_dim,
                pad_token_id=pad,
                track_experts=cfg.track_experts,
            )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        report["common_length"] = result.pop("common_length")
        consistent = (
            max(result["padded_max_rel_error"], result["equal_length_max_rel_error"]) <= cfg.tolerance
        )
        entry.update(status="tested", consistent=consistent, **result)
        logger.info(
            "%s: padded %.3g, equal-length %.3g -> %s",
            setting.name,
            result["padded_max_rel_error"],
            result["equal_length_max_rel_error"],
            "consistent" if consistent else "inconsistent",
        )
        if consistent:
            chosen = setting
            break

    first = report["settings"][0]
    report["consistent_as_configured"] = bool(first.get("consistent", False))
    report["consistent"] = chosen is not None
    if chosen is None:
        worst = max(
            max(e["padded_max_rel_error"], e["equal_length_max_rel_error"])
            for e in report["settings"]
            if e["status"] == "tested"
        )
        report["recommended"] = None
        report["flags"] = None
        report["message"] = (
            f"not consistent under any setting tried: batched gradients differ from one-by-one ones by "
            f"up to {worst:.3g} (--tolerance {cfg.tolerance:g}); raise --tolerance if that much is "
            "acceptable, else look for layers that mix documents of a batch (batch statistics, "
            "attention that sees padding)"
        )
    else:
        report["recommended"] = {
            "precision": chosen.precision,
            "force_math_sdp": chosen.force_math_sdp,
            "use_tf32_matmuls": chosen.use_tf32_matmuls,
        }
        flags = flags_for(chosen, cfg)
        report["flags"] = flags
        report["message"] = (
            "consistent with the current settings"
            if report["consistent_as_configured"]
            else "pass these flags to build and score: " + " ".join(flags)
        )
    if cfg.output:
        path = Path(cfg.output)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(_strict_json(report), indent=2, allow_nan=False) + "\n")
        except OSError as e:
            raise BergsonError(f"--output {cfg.output}: cannot write the report ({e})") from e
    return report


def test_model_configuration(cfg: ModelConfigTestConfig, loader: Loader | None = None) -> dict[str, Any]:
    """Check that batched per-example gradients match one-by-one ones; find settings that make them.

    Returns a report: per setting tried the largest relative error of a document's vector in a
    right-padded mixed-length batch and in an equal-length batch (against the vector computed
    alone), ``consistent`` (some setting passed ``cfg.tolerance``), ``consistent_as_configured``,
    ``recommended`` (the first passing setting) with the ``flags`` that select it, and a
    one-line ``message``. Writes the report as JSON to ``cfg.output`` when given.
    """
    return check_model_configuration(cfg, loader or load_model)


test_model_configuration.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def format_report(report: dict[str, Any], message: bool = True) -> str:
    """The settings table and (with ``message``) the final line."""
    lines = [
        f"{report['model']} on {report['device']}: {report.get('num_documents', 0)} documents, lengths "
        f"{report.get('lengths', [])}, equal-length batch cut to {report.get('common_length', '-')} tokens, "
        f"tolerance {report['tolerance']:g}",
        f"{'setting':<24} {'dtype':<9} {'padded max err':>15} {'equal-length max err':>21}  verdict",
    ]
    for e in report["settings"]:
        if e["status"] == "skipped":
            lines.append(f"{e['name']:<24} {'':<9} {'-':>15} {'-':>21}  skipped: {e['note']}")
            continue
        verdict = "consistent" if e["consistent"] else f"inconsistent (worst module {e['worst_module']})"
        lines.append(
            f"{e['name']:<24} {e['dtype']:<9} {e['padded_max_rel_error']:>15.3g} "
            f"{e['equal_length_max_rel_error']:>21.3g}  {verdict}"
        )
    if message:
        lines.append(report["message"])
    return "\n".join(lines)
