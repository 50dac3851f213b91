"""Loading models and tokenizers, and finding the layers whose gradients we track."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from .config import ModelOptions
from .core.devices import resolve_device
from .core.experts import ExpertLinear, expert_views, is_fused_experts, is_router, unsupported_reason
from .core.layout import AttentionConfig, base_model_prefix, in_base_model, match_names, module_shape
from .errors import BergsonError

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANTIZED = ("int4", "int8")
"""--precision values that load the linear layers quantized by bitsandbytes."""


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Map --precision to a torch dtype; 'auto' is bf16 on GPUs that support it, else fp32.
    For int4 / int8 it is the dtype of the layers left unquantized (and of 4-bit compute)."""
    if precision == "auto" or precision in QUANTIZED:
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if precision not in _DTYPES:
        raise BergsonError(
            f"--precision {precision!r}: choose one of auto, {', '.join(_DTYPES)}, {', '.join(QUANTIZED)}"
        )
    return _DTYPES[precision]


def quantization_config(precision: str, device: torch.device, dtype: torch.dtype) -> Any:
    """The transformers ``BitsAndBytesConfig`` of ``--precision int4|int8``: 4-bit NF4 weights
    computing in ``dtype``, or LLM.int8() weights. bitsandbytes runs on CUDA only."""
    if device.type != "cuda":
        raise BergsonError(
            f"--precision {precision}: bitsandbytes quantization needs a CUDA device, and this run's device "
            f"is {device}; use --precision fp32 or bf16 here, or run on a GPU"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise BergsonError(
            f"--precision {precision} needs bitsandbytes: pip install 'bergson[quantization]'"
        ) from e
    from transformers import BitsAndBytesConfig

    if precision == "int4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


@contextmanager
def numerics(opts: ModelOptions) -> Iterator[None]:
    """Apply ``--force_math_sdp`` and ``--use_tf32_matmuls`` inside the block; restore on exit.

    The math SDPA kernel affects models that run attention through
    ``torch.nn.functional.scaled_dot_product_attention`` (transformers' "sdpa"), not eager
    or flash-attention-2 implementations. TF32 flags only matter on CUDA; without
    ``use_tf32_matmuls`` the process's own TF32 settings are left as they are.
    """
    with ExitStack() as stack:
        if opts.force_math_sdp:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        if opts.use_tf32_matmuls:
            saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)

            def restore() -> None:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

            stack.callback(restore)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        yield


_F = TypeVar("_F", bound=Callable[..., Any])


def honours_numerics(fn: _F) -> _F:
    """Run an entry point ``fn(cfg, ...)`` inside :func:`numerics` of its config."""

    @functools.wraps(fn)
    def wrapper(cfg: ModelOptions, *args: Any, **kwargs: Any) -> Any:
        with numerics(cfg):
            return fn(cfg, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _is_local(path: str) -> bool:
    return os.path.isdir(os.path.expanduser(path))


def load_model(opts: ModelOptions) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer from a hub id or a local directory.

    A local directory never triggers a request to the hub. A directory holding a PEFT
    adapter (``adapter_config.json``) loads the base model with the adapter applied.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not opts.model:
        raise BergsonError("--model is required: a hub id or a local model directory")
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.precision, device)
    local = _is_local(opts.model)
    path = os.path.expanduser(opts.model) if local else opts.model
    if not local and (opts.model.startswith((".", "/", "~")) or opts.model.count("/") > 1):
        raise BergsonError(f"--model {opts.model}: no such directory")
    kwargs: dict[str, Any] = {
        "revision": opts.revision,
        "trust_remote_code": opts.trust_remote_code,
    }
    if local:
        kwargs["local_files_only"] = True
        kwargs.pop("revision")
    quantized = opts.precision in QUANTIZED
    fsdp = getattr(opts, "fsdp", False)  # only the commands that can shard offer --fsdp
    if quantized:
        if fsdp:
            raise BergsonError(
                f"--precision {opts.precision} with --fsdp: FSDP cannot shard quantized layers; drop one"
            )
        kwargs["quantization_config"] = quantization_config(opts.precision, device, dtype)
        kwargs["device_map"] = {"": device}
    try:
        if local and (Path(path) / "adapter_config.json").is_file():
            model = _load_peft(path, dtype, kwargs)
            tok_path = path
            if not (Path(path) / "tokenizer_config.json").is_file():
                peft_config: Any = model.peft_config
                tok_path = peft_config["default"].base_model_name_or_path
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
            tok_path = path
        data = getattr(opts, "data", None)
        if getattr(data, "tokenizer", None):  # --tokenizer: the documents' tokenizer, not the model's
            from .data.tokenize import document_tokenizer

            tokenizer = document_tokenizer(data, None)  # type: ignore[arg-type]
        else:
            tokenizer = AutoTokenizer.from_pretrained(tok_path, **kwargs)
    except (OSError, ValueError) as e:
        raise BergsonError(f"--model {opts.model}: could not load it ({e})") from e
    if not quantized:  # bitsandbytes placed the quantized model on its device already
        model.to(device)  # type: ignore[arg-type]
    model.eval()
    if fsdp:
        from .distributed import shard_model

        shard_model(model, device)
    return model, tokenizer


def _load_peft(path: str, dtype: torch.dtype, kwargs: dict[str, Any]) -> nn.Module:
    try:
        from peft import AutoPeftModelForCausalLM
    except ImportError as e:
        raise BergsonError(
            f"--model {path} is a PEFT adapter; install the extra: pip install 'bergson[peft]'"
        ) from e
    return AutoPeftModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)


def _supported_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def output_head_modules(model: nn.Module) -> list[str]:
    """The supported layers outside ``model.base_model`` (the output head: ``lm_head``,
    ``embed_out``), which are not tracked by default. None for a PEFT model (its adapter layers
    are tracked wherever they sit) or a model without a ``base_model``."""
    prefix = base_model_prefix(model)
    if not prefix or is_peft_model(model):
        return []
    supported = _supported_types()
    return [n for n, m in model.named_modules() if isinstance(m, supported) and not in_base_model(n, prefix)]


def find_tracked_modules(
    model: nn.Module,
    patterns: Sequence[str] = (),
    *,
    include_output_head: bool = False,
    track_experts: bool | Sequence[str] = False,
) -> dict[str, nn.Module]:
    """The layers whose per-example gradients are collected.

    Supported layer types: ``torch.nn.Linear`` (and subclasses such as quantized linears)
    and the GPT-2 style ``transformers.pytorch_utils.Conv1D``. Embedding tables and norms
    are not tracked. By default the layers inside ``model.base_model`` (the transformer body)
    are tracked and the output head outside it (``lm_head``, ``embed_out``) is not, as in the
    original bergson package; ``include_output_head`` adds it. With a PEFT model only the
    adapter layers are tracked (all of them); a model without a ``base_model`` has no head and
    every supported layer is tracked.

    ``patterns`` are exact names or glob patterns, spelled from the whole model
    (``gpt_neox.layers.*.mlp.*``) or from its base model (``layers.*.mlp.*``), that choose
    among all supported layers, the head included when a pattern names it; each pattern must
    name at least one. Layers with weight matrices of other types are skipped with a warning
    that lists them.

    Mixture-of-experts layers in transformers' fused form are tracked through views
    (:mod:`bergson.core.experts`). With ``track_experts=True`` every expert's projections, one block
    per expert (``{experts}.expert{e}.gate_up_proj`` / ``.down_proj``), and every router (under its
    own name) join the tracked set; with patterns instead (the original package's ``moe_experts``),
    the experts of the fused experts modules they name join it. ``patterns`` can also name views.
    """
    supported = _supported_types()
    peft = is_peft_model(model)
    prefix = base_model_prefix(model)
    candidates: dict[str, nn.Module] = {}
    skipped: set[str] = set()
    views: dict[str, ExpertLinear] = {}
    by_owner: dict[int, dict[str, ExpertLinear]] = {}
    for n, owner, v in [] if peft else expert_views(model):
        views[n] = by_owner.setdefault(id(owner), {})[n] = v
    for name, module in model.named_modules():
        if isinstance(module, supported):
            if not (peft and "lora_" not in name):
                candidates[name] = module
        elif id(module) in by_owner:
            candidates.update(by_owner[id(module)])  # in model order
        elif not isinstance(module, (nn.Embedding, nn.LayerNorm)) and any(
            p.ndim >= 2 for p in module.parameters(recurse=False)
        ):
            skipped.add(type(module).__name__)
    if skipped:
        logger.warning(
            "layers of unsupported types are not tracked: %s (supported: Linear, Conv1D, fused MoE experts "
            "and routers)",
            ", ".join(sorted(skipped)),
        )
    if views and not track_experts and not patterns:
        kinds = sorted({type(v.owner).__name__ for v in views.values()})
        logger.warning(
            "the model's mixture-of-experts layers (%s) are not tracked: --track_experts tracks every "
            "expert (one block each) and router",
            ", ".join(kinds),
        )
    if not candidates:
        raise BergsonError("--modules: the model has no supported layers (Linear or Conv1D) to track")
    head = set(output_head_modules(model))
    if include_output_head and not head:
        why = "a PEFT model's adapter layers are all tracked" if peft else "it has no base_model"
        raise BergsonError(
            f"--include_output_head: the model has no output head outside its base model ({why}); drop the option"
        )
    if patterns:
        chosen = {
            n
            for hits in match_names(
                patterns,
                list(candidates),
                prefix,
                "--modules",
                "supported layer (Linear, Conv1D, expert or router) of the model",
            ).values()
            for n in hits
        }
    else:
        chosen = {n for n in candidates if n not in head and n not in views}
    if track_experts and not views:
        why = sorted(
            {
                f"{type(m).__name__}: {unsupported_reason(m)}"
                for m in model.modules()
                if (is_fused_experts(m) or is_router(m)) and unsupported_reason(m)
            }
        )
        raise BergsonError(
            "--track_experts: the model has no fused mixture-of-experts layers or routers bergson can "
            + (f"track ({'; '.join(why)})" if why else "track; drop the option")
        )
    if track_experts is True:
        chosen |= set(views)
    elif track_experts:  # patterns naming experts modules
        owner_names = {n.rsplit(".expert", 1)[0] for n, v in views.items() if v.index is not None}
        hits = match_names(
            list(track_experts), sorted(owner_names), prefix, "--moe_experts", "fused experts module"
        )
        named = {n for names in hits.values() for n in names}
        chosen |= {n for n in views if n.rsplit(".expert", 1)[0] in named and views[n].index is not None}
    if include_output_head:
        chosen |= head
    tracked = {n: m for n, m in candidates.items() if n in chosen}
    if not tracked:  # only the head was supported, and it is left out by default
        raise BergsonError(
            f"--modules: the model's only supported layers are its output head {sorted(head)}; "
            "track it with --include_output_head"
        )
    untracked = sorted(head - chosen)
    if untracked:
        logger.info(
            "tracking %d layers of %s; the output head %s is not tracked (as in the original package; "
            "--include_output_head or a --modules pattern naming it tracks it)",
            len(tracked), prefix, ", ".join(untracked),
        )  # fmt: skip
    return tracked


COVERAGE_THRESHOLD = 0.5
"""Below this share of the model's matrix weights tracked, a run without --modules warns loudly."""

_COUNTED = (
    "parameters with ndim >= 2 (weight matrices, fused expert tensors); embedding tables "
    "(nn.Embedding weights), PEFT base weights and the output head are not counted in the share "
    "(the head is reported as head_params and under output_head)"
)
_FIXES = {
    "fused_experts": "fused mixture-of-experts weights: --track_experts tracks them, one block per expert",
    "router": "mixture-of-experts router weights: --track_experts tracks them",
    "experts_unsupported": "mixture-of-experts weights in a form bergson cannot run per expert (FSDP-sharded, "
    "expert-parallel): no option tracks them",
    "unsupported_type": "unsupported layer type (supported: Linear, Conv1D): no option tracks it yet",
    "not_matched": "not matched by --modules: a --modules pattern naming them tracks them",
    "peft_base": "frozen base weights of a PEFT model (only its adapter layers are tracked); "
    "not counted in the share",
}


def _matrices(module: nn.Module, seen: set[int]) -> list[torch.Tensor]:
    """``module``'s own parameters with ndim >= 2 not met before (tied tensors count once)."""
    out = []
    for p in module.parameters(recurse=False):
        if p.ndim >= 2 and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def tracking_record(
    model: nn.Module, modules: Mapping[str, nn.Module], *, modules_option: bool = False
) -> dict[str, Any]:
    """What a manifest records about the tracked set: where the base model sits (module names are
    spelled from the whole model), the output head's layers and whether they are tracked, and the
    coverage: which share of the model's matrix weights (by parameter count) ``modules`` track,
    and which layers are skipped and why. ``modules_option`` says the set was chosen by --modules
    (which silences the low-coverage warning, not the record)."""
    head = output_head_modules(model)
    supported, peft = _supported_types(), is_peft_model(model)
    tracked_ids = {id(m) for m in modules.values() if not isinstance(m, ExpertLinear)}
    viewed: dict[int, int] = {}  # parameter id -> elements its tracked expert / router views cover
    for m in modules.values():
        if isinstance(m, ExpertLinear):
            viewed[id(m.source)] = viewed.get(id(m.source), 0) + m.weight.numel()
    seen: set[int] = set()
    embedding = sum(
        p.numel() for m in model.modules() if isinstance(m, nn.Embedding) for p in _matrices(m, seen)
    )
    head_params = tied = 0
    for name in head:
        mats = [p for p in model.get_submodule(name).parameters(recurse=False) if p.ndim >= 2]
        tied += sum(p.numel() for p in mats if id(p) in seen)
        head_params += sum(p.numel() for p in _matrices(model.get_submodule(name), seen))
    total = tracked = 0
    skipped: dict[tuple[str, str], list[int]] = {}
    for name, module in model.named_modules():
        mats = _matrices(module, seen)
        n = sum(p.numel() for p in mats)
        if not n:
            continue
        if id(module) in tracked_ids:
            total, tracked = total + n, tracked + n
            continue
        part = sum(min(viewed.get(id(p), 0), p.numel()) for p in mats)
        total, tracked, n = total + part, tracked + part, n - part
        if not n:
            continue
        if isinstance(module, supported):
            reason = "peft_base" if peft and "lora_" not in name else "not_matched"
        elif is_router(module) or is_fused_experts(module):
            kind = "router" if is_router(module) else "fused_experts"
            ok = unsupported_reason(module) is None
            reason = ("not_matched" if part or modules_option else kind) if ok else "experts_unsupported"
        else:
            reason = "unsupported_type"
        total += 0 if reason == "peft_base" else n
        entry = skipped.setdefault((type(module).__name__, reason), [0, 0])
        entry[0], entry[1] = entry[0] + 1, entry[1] + n
    share = tracked / total if total else 1.0
    return {
        "base_model": base_model_prefix(model),
        "output_head": {"modules": head, "tracked": [n for n in head if n in modules]},
        "coverage": {
            "counted": _COUNTED,
            "peft": peft,
            "head_params": head_params + tied,
            "head_tied_to_embedding": bool(tied),
            "matrix_params": total,
            "tracked_params": tracked,
            "share": round(share, 6),
            "embedding_params": embedding,
            "skipped": [
                {"class": cls, "reason": why, "modules": k, "params": n, "note": _FIXES[why]}
                for (cls, why), (k, n) in sorted(skipped.items(), key=lambda kv: -kv[1][1])
            ],
            "modules_option": modules_option,
            "threshold": COVERAGE_THRESHOLD,
            "low": share < COVERAGE_THRESHOLD and not modules_option,
        },
    }


def announce_coverage(record: Mapping[str, Any]) -> None:
    """Print on the console what :func:`tracking_record` records: the tracked share, the head
    choice, the skipped layers; a loud warning when the share is low and --modules was not given."""
    cov, head = record["coverage"], record["output_head"]
    if head["modules"]:
        state = "tracked" if head["tracked"] else "not tracked (--include_output_head tracks it)"
        tie = ", tied to the embedding" if cov["head_tied_to_embedding"] else ""
        head_line = (
            f"output head {', '.join(head['modules'])} ({cov['head_params']:,} parameters{tie}): {state}"
        )
    elif cov["peft"]:
        head_line = "a PEFT model: its adapter layers are tracked wherever they sit, the head's included"
    else:
        head_line = "no output head outside the base model"
    skipped = "; ".join(
        f"{s['class']} x{s['modules']} ({s['params']:,} parameters): {s['note']}" for s in cov["skipped"]
    )
    logger.info(
        "tracking %.1f%% of the model's matrix weights (%s of %s parameters; embeddings and the output "
        "head not counted); %s%s",
        100 * cov["share"], f"{cov['tracked_params']:,}", f"{cov['matrix_params']:,}", head_line,
        f"; skipped: {skipped}" if skipped else "",
    )  # fmt: skip
    if cov["low"]:
        logger.warning(
            "ONLY %.1f%% OF THE MODEL'S MATRIX WEIGHTS ARE TRACKED (below %.0f%%): attributions reflect "
            "the tracked layers only. Not tracked: %s; %s. Pass --modules to choose the layers explicitly "
            "(this silences the warning).",
            100 * cov["share"], 100 * cov["threshold"], skipped, head_line,
        )  # fmt: skip


_ATTENTION_PARENTS = ("attn", "attention", "self_attn", "self_attention")


def _head_counts(config: Any) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size) from a transformers config."""
    n = next(
        (
            getattr(config, k)
            for k in ("num_attention_heads", "n_head", "num_heads")
            if getattr(config, k, None)
        ),
        None,
    )
    hidden = next((getattr(config, k) for k in ("hidden_size", "n_embd") if getattr(config, k, None)), None)
    if not n or not hidden:
        raise BergsonError(
            "--attention_heads auto: the model's config names no number of attention heads or hidden size; "
            "give NUM_HEADS:HEAD_SIZE:AXIS per module instead"
        )
    kv = getattr(config, "num_key_value_heads", None) or n
    if getattr(config, "model_type", "") == "falcon":
        if getattr(config, "new_decoder_architecture", False):
            kv = config.num_kv_heads
        elif getattr(config, "multi_query", False):
            kv = 1
    return n, kv, getattr(config, "head_dim", None) or hidden // n


def config_attention_heads(model: nn.Module, modules: Mapping[str, nn.Module]) -> dict[str, AttentionConfig]:
    """The attention-head split of every tracked attention projection, derived from the model's config
    (``--attention_heads auto``): q/k/v rows and the output projection's columns per head, grouped-query
    key/value heads included, and fused qkv layers as consecutive row blocks of one head each
    ([q; k; v] stacks: GPT-2, Phi-3, Falcon) or of one head's q, k and v together (GPT-NeoX, Falcon
    without multi-query). LoRA adapter layers are not split."""
    config = getattr(model, "config", None)
    if config is None:
        raise BergsonError(
            "--attention_heads auto: the model has no transformers config; give the splits per module"
        )
    n, kv, hd = _head_counts(config)
    grouped_fused = getattr(config, "model_type", "") == "gpt_neox" or (
        getattr(config, "model_type", "") == "falcon"
        and not getattr(config, "new_decoder_architecture", False)
        and not getattr(config, "multi_query", False)
    )
    out: dict[str, AttentionConfig] = {}
    for name, module in modules.items():
        parts = name.split(".")
        if len(parts) < 2 or parts[-2] not in _ATTENTION_PARENTS or "lora_" in name:
            continue
        leaf, (rows, cols) = parts[-1], module_shape(module)
        if leaf == "q_proj":
            split = AttentionConfig(n, hd, 0)
        elif leaf in ("k_proj", "v_proj"):
            split = AttentionConfig(kv, hd, 0)
        elif leaf in ("o_proj", "out_proj", "dense", "c_proj"):
            split = AttentionConfig(n, hd, 1)
        elif leaf in ("query_key_value", "qkv_proj", "c_attn"):
            split = AttentionConfig(n, 3 * hd, 0) if grouped_fused else AttentionConfig(n + 2 * kv, hd, 0)
        else:
            continue
        size = rows if split.head_dim == 0 else cols
        if split.num_heads * split.head_size != size:
            raise BergsonError(
                f"--attention_heads auto: {name} has {size} {split.axis}puts, not the config's "
                f"{split.num_heads} heads of {split.head_size}; give its split as NAME=NUM_HEADS:HEAD_SIZE:AXIS"
            )
        out[name] = split
    return out


def head_splits(
    model: nn.Module, modules: Mapping[str, nn.Module], specs: Sequence[str] | None
) -> Sequence[str] | dict[str, AttentionConfig] | None:
    """``--attention_heads`` as a run uses it: ``auto`` becomes the splits the model's config gives
    (:func:`config_attention_heads`); other specs pass through to the layout."""
    if not specs or "auto" not in specs:
        return specs
    if len(specs) != 1:
        raise BergsonError(
            "--attention_heads auto: give it alone (it splits every attention projection the config "
            "describes), or give every split as PATTERN=NUM_HEADS:HEAD_SIZE:AXIS"
        )
    splits = config_attention_heads(model, modules)
    if not splits:
        raise BergsonError(
            "--attention_heads auto: none of the tracked layers is an attention projection this model's "
            "config describes; give the splits as PATTERN=NUM_HEADS:HEAD_SIZE:AXIS"
        )
    return splits
