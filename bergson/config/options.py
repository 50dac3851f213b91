"""Option groups: the dataclasses every command's config is composed of.

A command's config (:mod:`bergson.config.commands`) inherits exactly the groups whose options it
reads, so that no command offers a flag it would ignore. Each field's docstring is its
``--help`` text. Nothing here imports torch, so that ``bergson --help`` answers quickly.
"""

from __future__ import annotations

import logging
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Annotated, Any, Literal

import tyro

from ..core.devices import launched
from ..errors import BergsonError
from .data import ChatTemplate, DataConfig, ValueBool, check_dataset, parse_kwargs, share_tokenizer
from .limits import check_limits

logger = logging.getLogger(__name__)

__all__ = ["ChatTemplate", "DataConfig", "ValueBool", "check_dataset", "parse_kwargs", "share_tokenizer"]

Precision = Literal["auto", "fp32", "bf16", "fp16", "int4", "int8"]
DampingMode = Literal["relative", "absolute"]
DIST_TIMEOUT = 7200.0
"""Seconds workers wait for each other by default (long: ranks finish at different times)."""


@dataclass
class FaissConfig:
    """How to build and query a FAISS index over a gradient store."""

    index_factory: str = "Flat"
    """FAISS index factory string: "Flat" is exact; "IVF1024,Flat" or "IVF4096,PQ64" are approximate."""
    mmap_index: bool = False
    """Memory-map the saved index instead of reading it into RAM (for indices larger than memory)."""
    nprobe: int = 10
    """Inverted lists an IVF index visits per query: higher is slower and finds more true neighbours."""
    num_shards: int = 1
    """Split the store into this many contiguous row ranges, each its own index (less memory per build)."""
    max_train_examples: int | None = None
    """Rows (sampled with a fixed seed) used to train IVF/PQ indices; default: 256 per IVF list, at least 65536."""


@dataclass
class TrainingConfig:
    """A fine-tuning recipe, replayed exactly by ``bergson magic`` and ``bergson validate``.

    Steps follow the Hugging Face Trainer's conventions: the loss of a step is the mean
    next-token cross-entropy over the loss tokens of its micro-batches, AdamW is
    torch.optim.AdamW (decoupled weight decay), the schedules are transformers'
    get_{constant,linear,cosine}_schedule_with_warmup and clipping is clip_grad_norm_.
    """

    optimizer: Literal["adamw", "sgd"] = "adamw"
    """adamw, or sgd (with --momentum and coupled weight decay, as torch.optim.SGD)."""

    lr: float = 1e-3
    """Peak learning rate."""

    beta1: float = 0.9
    """AdamW's first-moment decay."""

    beta2: float = 0.999
    """AdamW's second-moment decay."""

    eps: float = 1e-8
    """AdamW's epsilon."""

    eps_root: float = 0.0
    """AdamW's epsilon inside the square root: the update divides by sqrt(v_hat + eps_root) + eps."""

    momentum: float = 0.9
    """SGD momentum (0: plain SGD)."""

    weight_decay: float = 0.0
    """Weight decay (decoupled for AdamW, added to the gradient for SGD)."""

    schedule: Literal["constant", "linear", "cosine", "polynomial"] = "constant"
    """Learning-rate schedule after warmup (linear and cosine decay to 0 at the last step;
    polynomial decays to --lr_end as (1 - progress) ** --power)."""

    warmup_steps: float = 0
    """Steps of linear warmup from --lr_start to --lr; a value in (0, 1) is a fraction of the
    total steps (rounded up)."""

    lr_start: float = 0.0
    """Learning rate at the first warmup step."""

    lr_end: float = 0.0
    """With --schedule polynomial: the learning rate the decay ends at."""

    power: float = 1.0
    """With --schedule polynomial: the exponent of the decay (1: linear)."""

    max_grad_norm: float = 0.0
    """Clip the step's gradient to this global norm (0: no clipping)."""

    batch_size: int = 8
    """Documents per micro-batch."""

    grad_accumulation: int = 1
    """Micro-batches per optimizer step."""

    epochs: int = 1
    """Passes over the training documents."""

    seed: int = 0
    """Seed of the data order (a fresh permutation per epoch)."""

    freeze: list[str] = field(default_factory=list)
    """Glob patterns of parameter names kept fixed (e.g. 'gpt_neox.embed_in.*'). Adam's update of a
    row that only one document touches does not shrink with that document's weight, so freezing
    sparse input embeddings makes removal effects far more linear (and MAGIC far more accurate)."""


@dataclass
class ModelOptions:
    """Which model to load, and how (every command that loads a model)."""

    model: str = ""
    """Hub id or local directory of a causal language model (or of a PEFT adapter)."""

    revision: str | None = None
    """Model revision (branch, tag or commit) for hub models."""

    precision: Precision = "auto"
    """Weights' precision: fp32, bf16, fp16, auto (bf16 on a GPU that supports it, else fp32), or int4 / int8:
    the linear layers quantized by bitsandbytes (CUDA only; gradients flow through the frozen quantized layers)."""

    device: str = "auto"
    """Device to run on: auto (CUDA when present, else CPU), cpu, cuda, cuda:1, ..."""

    trust_remote_code: bool = False
    """Allow model code from the hub repository to run."""

    force_math_sdp: bool = False
    """Run attention with the math SDPA kernel (deterministic, batch-invariant) instead of flash / memory-efficient kernels."""

    use_tf32_matmuls: bool = False
    """Allow TF32 matmuls (and cuDNN TF32) on CUDA: faster fp32, with about 1e-3 relative rounding."""


@dataclass
class FsdpOptions:
    """Sharding the model over the workers (the commands whose passes FSDP2 can shard)."""

    fsdp: bool = False
    """Shard the model over the ranks with FSDP2 (fully_shard per decoder layer), for a model too big for one device.
    Each rank keeps 1/N of the weights; results equal an unsharded run."""


@dataclass
class WorkerOptions:
    """Worker processes (the commands that split their work over several ranks)."""

    nproc_per_node: int = 1
    """Worker processes to start on this machine, each taking a share of the shards (under torchrun, its flags decide)."""

    dist_timeout: float = DIST_TIMEOUT
    """Seconds a worker waits for the others at a barrier or reduction before failing (long: ranks finish at different times)."""

    def _check(self) -> None:
        if self.dist_timeout != DIST_TIMEOUT and self.nproc_per_node == 1 and not launched():
            raise BergsonError(
                f"--dist_timeout {self.dist_timeout}: it is how long workers wait for each other, and this is "
                "one process; drop it, or start several workers (--nproc_per_node N or torchrun)"
            )


@dataclass
class RunOptions:
    """The output directory of a run."""

    run_path: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="RUN_PATH")] = ""
    """Output directory of the run (a store, or a method's stages)."""

    overwrite: bool = False
    """Replace what run_path holds when it was made with other options (instead of refusing)."""


@dataclass
class DataOptions:
    """The documents a command computes gradients of."""

    data: DataConfig = field(default_factory=DataConfig)
    """Data options (each may also be written without the 'data.' prefix)."""

    def _check(self) -> None:
        # with --index the vectors come from a store; with --mix_train two fits are mixed
        if not any(getattr(self, name, None) for name in ("index", "mix_train", "mix_query")):
            check_dataset(self.data)
        self.data._check()


@dataclass
class QueryDataOptions:
    """The query documents of a method that scores training documents against them."""

    query: DataConfig = field(default_factory=DataConfig)
    """The query set (prompt/completion columns allowed); one score column per query."""

    def _check(self) -> None:
        check_dataset(self.query, "--query.dataset")
        self.query._check("--query.")
        data = getattr(self, "data", None)
        if isinstance(data, DataConfig):
            share_tokenizer(data, self.query)


@dataclass
class BatchOptions:
    """Token-budget batching."""

    token_batch_size: int | str = 2048
    """Token budget of a batch: documents are length-sorted and packed under it. 'auto' picks the largest
    budget that fits the device (a short out-of-memory probe on a GPU, a rule from available memory on a
    CPU), announced on the console and recorded in the manifest."""

    def _check(self) -> None:
        value = self.token_batch_size
        if isinstance(value, str):
            text = value.strip().lower()
            if text == "auto":
                self.token_batch_size = "auto"
            elif text.isdigit():
                self.token_batch_size = int(text)
                check_limits(self)
            else:
                raise BergsonError(
                    f"--token_batch_size {value!r}: give a number of tokens (at least 2) or 'auto' "
                    "(the largest budget that fits the device's memory)"
                )


@dataclass
class GradientOptions:
    """Which layers are tracked and how their gradients are projected."""

    projection_dim: int = 16
    """Random projection size p (p*p numbers per module); 0 stores full gradients."""

    projection_seed: int = 0
    """Seed of the projection matrices (regenerated from seed, module name and side)."""

    include_bias: bool = False
    """Include bias gradients (as an extra input column) in each module's vector."""

    modules: list[str] = field(default_factory=list)
    """Glob patterns of module names to track, spelled from the whole model ('gpt_neox.layers.*.mlp.*') or from
    its base model ('layers.*.mlp.*'); they may name the output head (default: every supported layer of the body)."""

    include_output_head: bool = False
    """Also track the output head (the layers outside the model's base_model: lm_head, embed_out). By default
    only the transformer body is tracked; the original bergson package did not track the head either."""

    track_experts: bool = False
    """Also track mixture-of-experts layers in transformers' fused form: every routed expert's projections,
    one block per expert ('...mlp.experts.expert3.down_proj'), and every router. Off by default (the original
    package skipped fused experts too); the coverage report says how much of the model it leaves out."""

    moe_experts: str = ""
    """The original package's spelling: comma-separated glob patterns naming fused experts modules
    ('model.layers.*.mlp.experts') whose experts are tracked, one block per expert (routers are not);
    --track_experts tracks every expert and router."""

    aggregate_experts: bool = False
    """With --track_experts (or --moe_experts): one block per fused expert parameter
    ('...mlp.experts.down_proj', the projection of the stacked experts x out x in gradient) instead of one
    per expert, so a row is as wide as a dense model's; needs --projection_dim > 0."""

    def tracked_experts(self) -> bool | list[str]:
        """What find_tracked_modules tracks of the mixture-of-experts layers: all (True), the experts
        modules the --moe_experts patterns name, or none (False)."""
        if self.track_experts and self.moe_experts:
            raise BergsonError(
                "--track_experts and --moe_experts: give one (--track_experts tracks every expert and "
                "router; --moe_experts only the experts modules its patterns name)"
            )
        patterns = [p.strip() for p in self.moe_experts.split(",") if p.strip()]
        if self.aggregate_experts and not (patterns or self.track_experts):
            raise BergsonError(
                "--aggregate_experts without --track_experts (or --moe_experts): no expert is tracked, so "
                "there is nothing to aggregate; add --track_experts or drop the option"
            )
        return patterns or self.track_experts


@dataclass
class HeadOptions:
    """Per-attention-head column blocks."""

    attention_heads: list[str] = field(default_factory=list)
    """Split modules into one block per attention head, each with its own projection:
    'PATTERN=NUM_HEADS:HEAD_SIZE:AXIS', AXIS out (q/k/v or fused qkv rows) or in (output projection
    columns); e.g. 'gpt_neox.layers.*.attention.query_key_value=4:48:out'. 'auto' derives every
    attention projection's split from the model's config (q/k/v, output projection, fused qkv,
    grouped-query key/value heads)."""


@dataclass
class LossOptions:
    """The per-document loss whose gradient is taken."""

    loss_reduction: Literal["sum", "mean"] = "sum"
    """Per-document loss: sum or mean of the next-token cross-entropies on its loss tokens."""


@dataclass
class StoreOptions:
    """What a gradient store keeps of each document's vector."""

    aggregation: Literal["none", "mean", "sum"] = "none"
    """Write one aggregated vector (a query index) instead of one row per document."""

    unit_normalize: bool = False
    """Scale each document's vector to unit norm (before aggregation)."""

    per_token: bool = False
    """Also keep one vector per token of every document (its positions' terms g_t x_tᵀ of the
    gradient, summing to the document's vector); score then writes per-token scores."""

    save_dtype: Literal["auto", "float16", "float32"] = "auto"
    """Storage dtype: auto is float16 for projected and float32 for full gradients."""

    def _check(self) -> None:
        if self.per_token and self.aggregation != "none":
            raise BergsonError(
                f"--per_token with --aggregation {self.aggregation}: an aggregated vector has no tokens to "
                "break down; drop one of the two"
            )


@dataclass
class ShardOptions:
    """Completed shard files (the unit of resuming and of splitting work over ranks)."""

    shard_size: int = 4096
    """Rows per completed shard file; a killed build resumes from the last completed shard."""


@dataclass
class NormalizerOptions:
    """Dividing gradients by an optimizer's second moments."""

    optimizer_state: str | None = None
    """optimizer.pt of a training run (or the checkpoint directory holding it): gradients are divided
    by the square root of its second moments (AdamW with bias correction, or Adafactor's factors)."""

    normalizer_form: Literal["auto", "adam", "rank_one"] = "auto"
    """With --optimizer_state: the optimizer's own form (auto), elementwise (adam), or the best rank-one
    (Adafactor) form of Adam's moments, which keeps the cheap projected path."""

    whitening: str | None = None
    """An EK-FAC run directory (``bergson ekfac``, or its eigen/ stage): each tracked module's gradient
    G becomes S^-1/2 G A^-1/2 with that fit's damped K-FAC factors, before projection and at no extra
    cost, so dot products of two stores built with it are projected K-FAC influence scores."""

    whitening_damping: float = 0.01
    """With --whitening: each factor gets sqrt(this) times the mean of its eigenvalues added (0.01 agrees
    best with EK-FAC at its default --damping 0.1: the damped factors' product adds cross terms)."""

    def _check(self) -> None:
        if self.whitening and self.optimizer_state:
            raise BergsonError(
                "--whitening with --optimizer_state: both divide the gradients by a curvature estimate; "
                "give one of the two"
            )
        if self.whitening_damping != NormalizerOptions.whitening_damping and not self.whitening:
            raise BergsonError(
                f"--whitening_damping {self.whitening_damping}: it damps the factors of --whitening, and "
                "none is given; give --whitening RUN, or drop the option"
            )
        if self.normalizer_form != "auto" and not self.optimizer_state:
            raise BergsonError(
                f"--normalizer_form {self.normalizer_form}: it says how the moments of --optimizer_state "
                "divide the gradients, and no --optimizer_state is given; give one, or drop the option"
            )


@dataclass
class PreconditionerOptions:
    """Applying a fitted preconditioner."""

    preconditioner_path: str | None = None
    """Preconditioner directory (from `bergson preconditioner`). build and reduce store H^-1/2 v; score
    applies whatever is still missing so that scores use H^-1 exactly once (H^-1/2 per side for cosines)."""


@dataclass
class DampingOptions:
    """Damping of a fitted curvature before inverting it."""

    damping: float = 0.1
    """Damping added to every eigenvalue before inverting (see --damping_mode)."""

    damping_mode: DampingMode = "relative"
    """relative: damping times the mean eigenvalue of each module (scale-free); absolute: as given."""


@dataclass
class CollectOptions(
    GradientOptions,
    BatchOptions,
    DataOptions,
    WorkerOptions,
    FsdpOptions,
    ModelOptions,
    RunOptions,
):
    """What every command that computes the gradients of a dataset into a run reads (build,
    reduce, score, preconditioner, trackstar, ekfac)."""


@dataclass
class PassOptions(ShardOptions, LossOptions, HeadOptions, CollectOptions):
    """The collection options of the commands whose pass runs shard by shard into a sink (build,
    reduce, score, preconditioner, trackstar): all of :class:`CollectOptions` and the shard size,
    the loss reduction and per-head blocks."""


def validate_options(cfg: Any) -> None:
    """Refuse numeric values outside their ranges (the one table :data:`bergson.config.limits.LIMITS`),
    values no option group of ``cfg`` accepts, and options given where they would be ignored
    (each group checks its own fields)."""
    check_limits(cfg)
    for group in reversed(type(cfg).__mro__):
        check = group.__dict__.get("_check")
        if check is not None:
            check(cfg)


def is_default(cfg: Any, name: str) -> bool:
    """Whether option ``name`` of ``cfg`` still has its default value (was not given)."""
    f = type(cfg).__dataclass_fields__[name]
    default = f.default_factory() if f.default_factory is not MISSING else f.default
    return getattr(cfg, name) == default


def given(cfg: Any, *groups: type) -> list[str]:
    """The flags of the options of ``groups`` (option group classes) that ``cfg`` sets to other
    than their defaults, nested groups as ``--group.field``."""
    out = []
    for group in groups:
        for f in fields(group):
            if f.name not in cfg.__dataclass_fields__ or is_default(cfg, f.name):
                continue
            value = getattr(cfg, f.name)
            if is_dataclass(value):
                out += [f"--{f.name}.{g.name}" for g in fields(value) if not is_default(value, g.name)]
            else:
                out.append(f"--{f.name}")
    return out


def unused_with(cfg: Any, when: str, groups: tuple[type, ...], why: str) -> list[str]:
    """Announce the options of ``groups`` that ``cfg`` sets although ``when`` makes them unused;
    returns them, for the run's manifest."""
    flags = given(cfg, *groups)
    if flags:
        logger.warning("%s with %s: %s, so %s not used", ", ".join(flags), when, why,
                       "it is" if len(flags) == 1 else "they are")  # fmt: skip
    return flags


COMPUTING = (
    ModelOptions, FsdpOptions, DataOptions, BatchOptions, GradientOptions, HeadOptions, LossOptions,
    ShardOptions, NormalizerOptions,
)  # fmt: skip
"""The groups of options that only matter when gradients are computed (not read from a store)."""
