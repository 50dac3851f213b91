"""The original package's Python form of gradient collection, beside ours.

``collect_gradients(model=, data=, processor=, path=, attention_cfgs=)`` takes a tokenized
``datasets.Dataset`` and a :class:`GradientProcessor` (projection and normalizer settings), writes
a gradient store at ``path`` (with the rows saved beside it as ``data.hf``) and returns the
store's ``datasets.Dataset`` view: the rows' columns, ``row_id``, ``num_tokens`` and a
``gradients`` column memory-mapped from the store. Our own form,
``collect_gradients(model, docs, sink=..., ...)`` (:func:`bergson.collect.loop.collect_gradients`),
is served by the same function: which one a call means follows from its arguments.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import torch
from torch import nn

from ..collect.loop import collect_gradients as collect_rows
from ..config import DataConfig, IndexConfig, save_yaml
from ..config.options import validate_options
from ..core.layout import (
    AttentionConfig,
    ModuleLayout,
    base_model_prefix,
    column_layouts,
    heads_of,
    module_shape,
)
from ..core.sinks import Sink
from ..data import TokenizedDocs, plan_shards
from ..errors import BergsonError
from ..models import find_tracked_modules
from ..runs.manifests import make_manifest
from ..runs.shared_store import collect_with
from ..store import StoreWriter, load_gradients
from ..transforms.normalizers import NORMALIZERS_FILE, Normalizer, save_normalizers

logger = logging.getLogger(__name__)

DATA_DIR = "data.hf"


@dataclass
class GradientProcessor:
    """How gradients are projected and normalized, in the original package's terms.

    ``projection_dim`` None or 0 keeps full gradients (the original's default); otherwise each
    module's gradient G is stored as L G Rᵀ with Gaussian L, R of ``projection_dim`` rows drawn
    from ``projection_seed``. ``normalizers`` divide gradients by optimizer second moments
    (:class:`bergson.AdafactorNormalizer`, :class:`bergson.AdamNormalizer`), keyed by module name
    (full, or relative to ``model.base_model`` as the original wrote them).

    The original's other settings are accepted where they mean something here: a projection
    type, scale or version other than ours is announced and recorded in the store's manifest
    (``producer.substitutions``: our Gaussian matrices are used, which estimate the same inner
    products); ``hessians``, ``reshape_to_square`` and ``projection_target='global'`` are refused
    with the way to get them.
    """

    normalizers: Mapping[str, Normalizer] = field(default_factory=dict)
    hessians: Mapping[str, Any] = field(default_factory=dict)
    hessians_eigen: Mapping[str, Any] = field(default_factory=dict)
    projection_dim: int | None = None
    reshape_to_square: bool = False
    projection_type: Literal["normal", "rademacher"] = "normal"
    projection_target: Literal["per_module", "global"] = "per_module"
    projection_scale: Literal["jl", "row_norm"] = "jl"
    include_bias: bool = False
    projection_seed: int | None = None
    projection_version: int | None = None

    def index_options(self) -> tuple[dict[str, Any], list[str]]:
        """(our IndexConfig fields, substitutions to announce and record) for these settings."""
        if self.hessians or self.hessians_eigen:
            raise BergsonError(
                "GradientProcessor(hessians=...): fit a preconditioner with `bergson preconditioner` and pass "
                "its directory as preconditioner_path=... to collect_gradients (bergson stores H^-1/2 g)"
            )
        if self.reshape_to_square:
            raise BergsonError(
                "GradientProcessor(reshape_to_square=True) is not supported: each module is projected on its "
                "own (out x in) axes; drop the option"
            )
        if self.projection_target != "per_module":
            raise BergsonError(
                f"GradientProcessor(projection_target={self.projection_target!r}): bergson projects each module "
                "on its own (per_module); drop the option"
            )
        p = int(self.projection_dim or 0)
        if p < 0:
            raise BergsonError(f"GradientProcessor(projection_dim={p}): must be None, 0 or positive")
        notes = []
        if p:
            if self.projection_type != "normal":
                notes.append(f"projection_type={self.projection_type!r}: Gaussian (normal) matrices are used")
            if self.projection_scale != "jl":
                notes.append(
                    f"projection_scale={self.projection_scale!r}: entries of variance 1/p (jl) are used"
                )
            if self.projection_version is not None:
                notes.append(
                    f"projection_version={self.projection_version}: bergson's own matrices are used (they "
                    "differ from the original's; stores of the two are not comparable)"
                )
        options = {
            "projection_dim": p,
            "projection_seed": int(self.projection_seed or 0),
            "include_bias": self.include_bias,
        }
        return options, notes


def docs_from_dataset(data: Any) -> TokenizedDocs:
    """A tokenized ``datasets.Dataset`` as documents: ``input_ids``; ``labels`` (-100 where no loss;
    elsewhere equal to the token) select the loss positions; ``advantage`` weights each row's loss."""
    cols = getattr(data, "column_names", None)
    if cols is None or "input_ids" not in cols:
        raise BergsonError(
            "collect_gradients(data=...): a tokenized datasets.Dataset with an input_ids column is needed, e.g. "
            "data = dataset.map(lambda row: tokenizer(row['text'], truncation=True))"
        )
    ids = [np.asarray(x, np.int64) for x in data["input_ids"]]
    masks = None
    if "labels" in cols:
        masks = []
        for i, (seq, labels) in enumerate(zip(ids, data["labels"])):
            labels = np.asarray(labels, np.int64)
            keep = labels != -100
            if labels.shape != seq.shape or not np.array_equal(labels[keep], seq[keep]):
                raise BergsonError(
                    f"collect_gradients(data=...): row {i}'s labels are not its input_ids with -100 where no "
                    "loss is taken; bergson scores next-token predictions of the row's own tokens"
                )
            masks.append(keep)
    weights = np.asarray(data["advantage"], np.float64) if "advantage" in cols else None
    return TokenizedDocs(ids, np.zeros(len(ids), np.int64), masks, weights)


def _full_name(name: str, named: Sequence[str], what: str) -> str:
    """A module name of the model, given as is or relative to its base model (the original's)."""
    if name in named:
        return name
    hits = [n for n in named if n.endswith("." + name)]
    if len(hits) == 1:
        return hits[0]
    raise BergsonError(
        f"{what} {name!r}: {'several' if hits else 'no'} modules of the model match; modules look like "
        f"{next((n for n in named if n), '(none)')!r}"
    )


def _heads(attention_cfgs: Mapping[str, AttentionConfig], named: Sequence[str]) -> dict[str, AttentionConfig]:
    """The original's head splits on our names; its ``head_dim=2`` (the output-feature axis of the
    layer's gradient [batch, seq, out]) is our output axis."""
    out = {}
    for name, c in attention_cfgs.items():
        axis = 0 if c.head_dim == 2 else c.head_dim
        out[_full_name(name, named, "attention_cfgs")] = AttentionConfig(c.num_heads, c.head_size, axis)
    return out


def _token_budget(docs: TokenizedDocs, batches: Sequence[Sequence[int]] | None, given: int | None) -> int:
    lengths = docs.lengths
    if given:
        return given
    if batches:
        return max(int(lengths[list(b)].max(initial=0)) * len(b) for b in batches if len(b)) or 2
    return max(2048, int(lengths.max(initial=2)))


def collect_to_dataset(
    model: nn.Module,
    data: Any,
    processor: GradientProcessor | None = None,
    path: str | Path | None = None,
    *,
    attention_cfgs: Mapping[str, AttentionConfig] | None = None,
    target_modules: Sequence[str] | None = None,
    batches: Sequence[Sequence[int]] | None = None,
    cfg: IndexConfig | None = None,
    **options: Any,
) -> Any:
    """The original form: gradients of every row of ``data`` into the store at ``path`` (or
    ``cfg.run_path``), returned as the store's ``datasets.Dataset`` view (see module docstring).

    ``options`` are fields of :class:`bergson.IndexConfig` (``token_batch_size``, ``overwrite``,
    ``loss_reduction``, ``unit_normalize``, ``preconditioner_path``, ...). ``batches`` (lists of row
    indices) sets the token budget to that of their largest batch; bergson packs rows itself
    (the vectors do not depend on batching)."""
    given = processor is not None
    processor = processor or GradientProcessor()
    proc_options, notes = processor.index_options()
    if not given:  # the original's defaults (full gradients), unless cfg or options say otherwise
        proc_options = {} if cfg is not None else {k: v for k, v in proc_options.items() if k not in options}
    elif cfg is not None:
        differ = [
            k
            for k, v in proc_options.items()
            if getattr(cfg, k) != v and getattr(IndexConfig(), k) != getattr(cfg, k)
        ]
        if differ:
            raise BergsonError(
                f"collect_gradients: {differ} given twice (processor and cfg) with different values"
            )
    twice = sorted(
        set(options)
        & {*(proc_options if given else ()), "modules", "attention_heads", "run_path", "model", "data"}
    )
    if twice:
        raise BergsonError(
            f"collect_gradients: {twice} come from processor=, target_modules=, attention_cfgs=, path= and the "
            "model; pass each once"
        )
    unknown = sorted(set(options) - {f.name for f in fields(IndexConfig)})
    if unknown:
        raise BergsonError(
            f"collect_gradients: unknown options {unknown}; they are fields of bergson.IndexConfig"
        )
    base = cfg or IndexConfig()
    run_path = str(path) if path is not None else base.run_path
    if not run_path:
        raise BergsonError("collect_gradients: path=... (the store's directory) is required")
    docs = docs_from_dataset(data)
    named = [n for n, _ in model.named_modules()]
    patterns = (
        [_full_name(n, named, "target_modules") for n in target_modules] if target_modules else base.modules
    )
    modules = find_tracked_modules(model, patterns)
    heads = _heads(attention_cfgs or {}, named)
    p = proc_options.get("projection_dim", base.projection_dim)
    layouts = column_layouts(modules, p, proc_options.get("include_bias", base.include_bias), heads)
    specs = [
        f"{m}={h.num_heads}:{h.head_size}:{'out' if h.head_dim == 0 else 'in'}"
        for m, h in heads_of(layouts).items()
    ]
    normalizers = {_full_name(k, named, "normalizers"): v for k, v in processor.normalizers.items()} or None
    dtype = next(model.parameters()).dtype
    budget = _token_budget(docs, batches, options.pop("token_batch_size", None))
    if batches:
        logger.info(
            "batches: bergson packs rows itself under the token budget of the largest (%d tokens)", budget
        )
    cfg = replace(
        base,
        run_path=run_path,
        model=str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__),
        data=DataConfig(dataset=str(Path(run_path) / DATA_DIR)),
        modules=list(patterns),
        attention_heads=specs,
        token_batch_size=budget,
        **{
            "save_dtype": "float32" if dtype in (torch.float32, torch.float64) else "float16",
            **proc_options,
            **options,
        },
    )
    validate_options(cfg)
    for note in notes:
        logger.warning("GradientProcessor(%s)", note)
    manifest = make_manifest(cfg, model, modules, docs, budget, normalizers)
    manifest.producer = {
        **manifest.producer,
        "api": "collect_gradients(data=, processor=)",
        "substitutions": notes,
    }
    writer = StoreWriter(cfg.run_path, manifest, overwrite=cfg.overwrite, foreign_files=(DATA_DIR,))
    if not writer.complete:
        save_yaml(cfg, writer.root / "config.yaml")
        if normalizers:
            save_normalizers(writer.root / NORMALIZERS_FILE, normalizers)
        shutil.rmtree(writer.root / DATA_DIR, ignore_errors=True)
        data.save_to_disk(str(writer.root / DATA_DIR))
        pad = getattr(getattr(model, "config", None), "pad_token_id", None)
        collect_with(cfg, model, docs, modules, writer, normalizers, pad, unit_normalize=cfg.unit_normalize)
        writer.finalize(len(plan_shards(len(docs), cfg.shard_size)))
    return load_gradients(cfg.run_path).to_dataset(data)


@overload
def collect_gradients(
    model: nn.Module, docs: TokenizedDocs, *, sink: Sink | None = None, **options: Any
) -> Sink: ...
@overload
def collect_gradients(
    model: nn.Module,
    docs: Any = None,
    processor: GradientProcessor | None = None,
    path: str | Path | IndexConfig | None = None,
    **options: Any,
) -> Any: ...
def collect_gradients(
    model: nn.Module,
    docs: Any = None,
    processor: GradientProcessor | None = None,
    path: str | Path | IndexConfig | None = None,
    **options: Any,
) -> Any:
    """Per-document gradients, in either form.

    ``collect_gradients(model, docs, sink=..., projection_dim=..., ...)`` with tokenized documents
    (:class:`bergson.data.TokenizedDocs`) is ours: every row's vector goes to ``sink`` (an
    in-memory one by default), which is returned.

    ``collect_gradients(model=, data=, processor=, path=, attention_cfgs=)`` with a tokenized
    ``datasets.Dataset`` is the original package's: a store is written at ``path`` and its
    ``datasets.Dataset`` view (with a ``gradients`` column) is returned (:func:`collect_to_dataset`;
    a ``bergson.IndexConfig`` in place of ``path``, or as ``cfg=``, gives the store's options).
    """
    data = options.pop("data", None)
    if data is not None and docs is not None:
        raise BergsonError("collect_gradients: pass the rows once (data=... or the second argument)")
    data = docs if data is None else data
    if isinstance(path, IndexConfig):
        options["cfg"], path = path, None
    original = {"attention_cfgs", "target_modules", "batches", "cfg"} & set(options)
    if isinstance(data, TokenizedDocs) and processor is None and path is None and not original:
        return collect_rows(model, data, **options)
    if isinstance(data, TokenizedDocs):
        raise BergsonError(
            "collect_gradients: processor=/path= take a tokenized datasets.Dataset (the original form); with "
            "TokenizedDocs pass our options (projection_dim=..., sink=...)"
        )
    if data is None:
        raise BergsonError("collect_gradients: no rows given (data=... a tokenized datasets.Dataset)")
    return collect_to_dataset(model, data, processor, path, **options)


# ------------------------------------------------------------------ stores of the original package
def _model_skeleton(name: str | None, given: bool) -> nn.Module | None:
    """The model's modules without its weights (for names and shapes). A model the store's
    config names that cannot be found is announced and left out (None); one ``given`` is an error."""
    if not name:
        logger.warning(
            "the store names no model: module names are kept and shapes stay unknown (pass --model)"
        )
        return None
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(name)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError) as e:
        if given:
            raise BergsonError(f"--model {name}: cannot read its configuration ({str(e)[:200]})") from e
        logger.warning(
            "model %s (from the store's config.yaml) is unavailable (%s): module names are kept and shapes stay "
            "unknown, so queries traced on a model cannot search the store; pass --model",
            name,
            str(e)[:200],
        )
        return None


def _our_layouts(layouts: list[ModuleLayout], model: nn.Module | None, p: int) -> list[ModuleLayout]:
    """The original's column blocks under our names (full module names, heads as ``NAME.head{h}``)
    and with the layers' shapes, checked against the widths stored."""
    if model is None:
        return layouts
    named = dict(model.named_modules())
    out, counts = [], {}
    for layout in layouts:
        base, sep, h = layout.name.rpartition(".head_")
        if sep and h.isdigit():
            counts[base] = counts.get(base, 0) + 1
    for layout in layouts:
        base, sep, h = layout.name.rpartition(".head_")
        is_head = bool(sep and h.isdigit())
        full = _full_name(base if is_head else layout.name, list(named), f"store module {layout.name}")
        rows, cols = module_shape(named[full])
        new = replace(layout, name=full, type=type(named[full]).__name__)
        if is_head:
            size = rows // counts[base]
            start = int(h) * size
            new.name, rows = f"{full}.head{h}", size
            new.head = {"module": full, "index": int(h), "num_heads": counts[base], "axis": "out",
                        "start": start, "stop": start + size}  # fmt: skip
        new.shape = [rows, cols]
        expected = p * p if p else rows * cols + (rows if layout.bias else 0)
        if new.dim != expected:
            raise BergsonError(
                f"store module {layout.name}: {new.dim} columns, but {full} is {rows} x {cols}"
            )
        out.append(new)
    return out


def convert_store(
    source: str | Path,
    dest: str | Path,
    *,
    model: str | None = None,
    overwrite: bool = False,
    block_rows: int = 4096,
) -> Any:
    """Rewrite a store of the original package (``info.json``, ``gradients.bin``, ``data.hf``) as one
    of ours at ``dest``, once: bfloat16 values widened to float32, module names made full and their
    shapes filled in from ``model`` (default: the model its ``config.yaml`` names; only its
    configuration is read), so that queries traced on the model search it. Returns the new store."""
    from ..store.legacy import (
        bfloat16_to_float32,
        legacy_manifest,
        legacy_parts,
        load_rows_data,
        map_gradients,
        read_info,
        row_meta,
    )

    root = Path(source)
    parts = legacy_parts(root)
    if not parts:
        raise BergsonError(
            f"convert {root}: no info.json and gradients.bin there (not a store of the original)"
        )
    infos = [read_info(p) for p in parts]
    if any(i.get("attribute_tokens") for i in infos):
        raise BergsonError(
            f"convert {root}: per-token stores of the original have no per-document rows to convert"
        )
    manifest = legacy_manifest(root, parts[0], infos[0], sum(i["num_grads"] for i in infos))
    skeleton = _model_skeleton(model or manifest.model.get("name"), given=bool(model))
    manifest.modules = _our_layouts(manifest.modules, skeleton, int(manifest.projection["dim"]))
    # names are now full: record where the base model sits, as our builds do (traces name-match by it)
    if skeleton is not None:
        manifest.model = {**manifest.model, "base_model": base_model_prefix(skeleton)}
    if model:
        manifest.model = {**manifest.model, "name": model}
    stored = infos[0]["scalar_dtype"]
    manifest.dtype = "float16" if stored == "float16" else "float32"
    manifest.status, manifest.shards = "in_progress", []
    manifest.plan = {"shard_size": block_rows}
    manifest.producer = {**manifest.producer, "converted_from": str(root.resolve()), "stored_dtype": stored}
    writer = StoreWriter(dest, manifest, overwrite=overwrite)
    if writer.complete:
        return load_gradients(dest)
    shard, start = 0, 0
    for part, info in zip(parts, infos):
        raw = map_gradients(part, info)
        data = load_rows_data(part)
        meta = row_meta(data, info["num_grads"])
        for s in range(0, raw.shape[0], block_rows):
            block = np.asarray(raw[s : s + block_rows])
            values = bfloat16_to_float32(block) if stored == "bfloat16" else block
            rows = range(start + s, start + s + len(block))
            if not writer.done(shard):
                writer.begin_shard(shard, rows)
                writer.write(
                    np.asarray(rows), values, meta[0][s : s + len(block)], meta[1][s : s + len(block)]
                )
                writer.end_shard(shard)
            shard += 1
        start += raw.shape[0]
    writer.finalize(shard)
    return load_gradients(dest)
