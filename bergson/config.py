"""Configuration dataclasses shared by the command line, YAML files and the Python API.

Each field's docstring is its ``--help`` text. Nothing here imports torch, so that
``bergson --help`` answers quickly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import tyro

from .errors import BergsonError

Precision = Literal["auto", "fp32", "bf16", "fp16", "int4", "int8"]


@dataclass
class DataConfig:
    """Which documents to read and how to turn them into token sequences."""

    dataset: str = ""
    """Hub id, local .json/.jsonl/.csv/.parquet file (optionally .gz), or save_to_disk directory."""

    split: str = "train"
    """Split to read, with optional slice syntax such as 'train[:1000]' or 'train[10%:20%]'."""

    subset: str | None = None
    """Configuration name of a hub dataset that has several."""

    prompt_column: str = "text"
    """Column holding the text (or, with --completion_column, the prompt)."""

    completion_column: str | None = None
    """Optional column holding a completion; the loss is then taken on the completion only."""

    conversation_column: str | None = None
    """Column holding chat conversations (lists of {role, content} messages), rendered with the
    tokenizer's chat template; the loss is taken on the assistant turns only."""

    reward_column: str | None = None
    """Column of rewards (with --completion_column): each row's loss is multiplied by its Dr. GRPO
    advantage, the reward minus the mean reward of the rows with the same prompt (no std scaling)."""

    truncation: bool = False
    """Truncate documents longer than the token budget (or --max_length) instead of failing."""

    max_length: int | None = None
    """Truncation length in tokens; defaults to the token budget and the model's context size."""

    @classmethod
    def from_manifest(cls, data: dict[str, Any]) -> DataConfig:
        """The data options recorded in a store's manifest (its other data fields left out)."""
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


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
class ModelOptions:
    """Fields every command that loads a model accepts."""

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

    fsdp: bool = False
    """Shard the model over the ranks with FSDP2 (fully_shard per decoder layer), for a model too big for one device.
    Each rank keeps 1/N of the weights; results equal an unsharded run. (build, score, preconditioner, ekfac.)"""


@dataclass
class IndexConfig(ModelOptions):
    """Options of ``bergson build``: collect per-document gradients into a store."""

    run_path: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="RUN_PATH")] = ""
    """Output directory of the gradient store."""

    data: DataConfig = field(default_factory=DataConfig)
    """Data options (each may also be written without the 'data.' prefix)."""

    token_batch_size: int = 2048
    """Token budget of a batch: documents are length-sorted and packed under it."""

    projection_dim: int = 16
    """Random projection size p (p*p numbers per module); 0 stores full gradients."""

    projection_seed: int = 0
    """Seed of the projection matrices (regenerated from seed, module name and side)."""

    include_bias: bool = False
    """Include bias gradients (as an extra input column) in each module's vector."""

    modules: list[str] = field(default_factory=list)
    """Glob patterns of module names to track (default: every supported layer)."""

    attention_heads: list[str] = field(default_factory=list)
    """Split modules into one block per attention head, each with its own projection:
    'PATTERN=NUM_HEADS:HEAD_SIZE:AXIS', AXIS out (q/k/v or fused qkv rows) or in (output projection
    columns); e.g. 'gpt_neox.layers.*.attention.query_key_value=4:48:out'."""

    loss_reduction: Literal["sum", "mean"] = "sum"
    """Per-document loss: sum or mean of the next-token cross-entropies on its loss tokens."""

    aggregation: Literal["none", "mean", "sum"] = "none"
    """Write one aggregated vector (a query index) instead of one row per document."""

    unit_normalize: bool = False
    """Scale each document's vector to unit norm (before aggregation)."""

    per_token: bool = False
    """Also keep one vector per token of every document (its positions' terms g_t x_tᵀ of the
    gradient, summing to the document's vector); score then writes per-token scores."""

    save_dtype: Literal["auto", "float16", "float32"] = "auto"
    """Storage dtype: auto is float16 for projected and float32 for full gradients."""

    shard_size: int = 4096
    """Rows per completed shard file; a killed build resumes from the last completed shard."""

    overwrite: bool = False
    """Replace an existing store at run_path built with different options."""

    nproc_per_node: int = 1
    """Worker processes to start on this machine, each taking a share of the shards (under torchrun, its flags decide)."""

    dist_timeout: float = 7200.0
    """Seconds a worker waits for the others at a barrier or reduction before failing (long: ranks finish at different times)."""

    optimizer_state: str | None = None
    """optimizer.pt of a training run (or the checkpoint directory holding it): gradients are divided
    by the square root of its second moments (AdamW with bias correction, or Adafactor's factors)."""

    normalizer_form: Literal["auto", "adam", "rank_one"] = "auto"
    """With --optimizer_state: the optimizer's own form (auto), elementwise (adam), or the best rank-one
    (Adafactor) form of Adam's moments, which keeps the cheap projected path."""

    preconditioner_path: str | None = None
    """Preconditioner directory (from `bergson preconditioner`). build and reduce store H^-1/2 v; score
    applies whatever is still missing so that scores use H^-1 exactly once (H^-1/2 per side for cosines)."""


_T = TypeVar("_T")


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Convert a YAML value to the annotated field type (nested dataclasses included)."""
    if isinstance(tp, type) and is_dataclass(tp):
        if not isinstance(value, dict):
            raise BergsonError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    origin = get_origin(tp)
    if origin is list and isinstance(value, list):
        (inner,) = get_args(tp) or (Any,)
        return [_convert(inner, v, where) for v in value]
    return value


def from_dict(cls: type[_T], values: dict[str, Any], where: str = "config") -> _T:
    """Build a config dataclass from a (possibly nested) dict, rejecting unknown keys."""
    assert is_dataclass(cls)
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise BergsonError(
            f"{where}: unknown option(s) {', '.join(unknown)}; valid options are {', '.join(sorted(known))}"
        )
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def load_yaml(cls: type[_T], path: str | Path) -> _T:
    """Load a config dataclass from a YAML file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise BergsonError(f"--config: no such file {p}")
    try:
        values = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise BergsonError(f"--config: {p} is not valid YAML: {e}") from e
    if not isinstance(values, dict):
        raise BergsonError(f"--config: {p} must hold a mapping of option names to values")
    return from_dict(cls, values, where=str(p))


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain data (for YAML and manifests)."""
    return asdict(cfg)


def save_yaml(cfg: Any, path: str | Path) -> None:
    """Write the resolved config next to a run's output."""
    import yaml

    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


@dataclass
class ReduceConfig(IndexConfig):
    """Options of ``bergson reduce``: one aggregated vector for a dataset (a query index)."""

    aggregation: Literal["none", "mean", "sum"] = "mean"
    """How rows are combined: mean or sum (after --unit_normalize, if given)."""

    index: str | None = None
    """Reduce this existing gradient store instead of computing gradients of --dataset."""


@dataclass
class ScoreConfig(IndexConfig):
    """Options of ``bergson score``: score every document against query gradients in one pass."""

    query_path: str = ""
    """Query store (from ``bergson build`` or ``bergson reduce``) whose rows score the dataset."""

    score: Literal["individual", "mean", "max"] = "individual"
    """individual: a column per query row; mean or max over query rows (max: LESS-style)."""

    query_group_column: str | None = None
    """With --score max: a column of the query dataset; mean within each group, then max over groups."""

    index: str | None = None
    """Score this existing gradient store instead of computing gradients of --dataset."""

    top_k: int = 5
    """How many top-scoring rows to print per score column."""


@dataclass
class QueryConfig(ModelOptions):
    """Options of ``bergson query``: the training rows behind a query text."""

    index: str = ""
    """Gradient store to search (from ``bergson build``)."""

    query: str | None = None
    """A query text; without --query and --query_dataset an interactive prompt opens."""

    query_dataset: str | None = None
    """Queries from a dataset: hub id, local file or save_to_disk directory."""

    query_split: str = "train"
    """Split of --query_dataset (slice syntax allowed)."""

    query_column: str = "text"
    """Column of --query_dataset holding the query text (or prompt)."""

    query_completion_column: str | None = None
    """Optional completion column of --query_dataset: the query loss is on the completion only."""

    top_k: int = 10
    """How many training rows to return per query."""

    unit_norm: bool = False
    """Score by cosine similarity instead of the raw gradient inner product."""

    reverse: bool = False
    """Return the most negative scores (opponents) instead of the most positive."""

    modules: list[str] = field(default_factory=list)
    """Search only these modules of the store (default: all)."""

    output: str | None = None
    """Write the hits to a .jsonl, .csv or .parquet file."""

    search: Literal["exact", "faiss"] = "exact"
    """exact: stream the whole store; faiss: an approximate index built beside the store."""

    faiss: FaissConfig = field(default_factory=FaissConfig)
    """FAISS index options (with --search faiss)."""

    preconditioner_path: str | None = None
    """Preconditioner directory: queries get H^-1 (with --unit_norm, H^-1/2; the index must then carry
    H^-1/2, i.e. be built with the same --preconditioner_path). A preconditioner the index carries is
    used without this option."""

    snippet_chars: int = 160
    """Characters of each training document shown and written."""

    per_token: bool = False
    """Split each hit's score over tokens: the query's, and the training document's when the store
    was built with --per_token (printed: the top few; written: all)."""


DampingMode = Literal["relative", "absolute"]


@dataclass
class PreconditionerConfig(IndexConfig):
    """Options of ``bergson preconditioner``: fit (or mix) per-module gradient second moments."""

    index: str | None = None
    """Fit on the vectors of this existing gradient store instead of computing gradients of --dataset."""

    max_documents: int | None = None
    """Fit on a random sample of this many documents of --dataset (default: all)."""

    sample_seed: int = 0
    """Seed of the --max_documents sample."""

    damping: float = 0.1
    """Damping added to every eigenvalue before inverting (see --damping_mode)."""

    damping_mode: DampingMode = "relative"
    """relative: damping times the mean eigenvalue of each module (scale-free); absolute: as given."""

    mix_train: str | None = None
    """With --mix_query: mix two fitted preconditioners (TrackStar) instead of fitting one."""

    mix_query: str | None = None
    """Preconditioner fitted on the query set, mixed with --mix_train."""

    downweight_components: int = 10
    """Mixing: the query weight is set so that this many top query components outweigh every
    training direction (clipped to the query moment's rank)."""


@dataclass
class TrackstarConfig(IndexConfig):
    """Options of ``bergson trackstar``: normalizer, mixed preconditioner and cosine scores in one run."""

    query: DataConfig = field(default_factory=DataConfig)
    """The query set (prompt/completion columns allowed)."""

    unit_normalize: bool = True
    """Score by cosine of the preconditioned vectors (TrackStar); --no_unit_normalize for dot products."""

    stats_documents: int | None = 1000
    """Training documents sampled for the training-set second moment (None or 0: all)."""

    sample_seed: int = 0
    """Seed of the --stats_documents sample."""

    damping: float = 0.1
    """Damping added to every eigenvalue before inverting (see --damping_mode)."""

    damping_mode: DampingMode = "relative"
    """relative: damping times the mean eigenvalue of each module; absolute: as given."""

    downweight_components: int = 10
    """How many top query components the mixed preconditioner down-weights (0: no mixing, use
    the training-set preconditioner alone)."""

    top_k: int = 10
    """Training documents listed per query in the summary."""


@dataclass
class EkfacConfig(IndexConfig):
    """Options of ``bergson ekfac``: EK-FAC influence of every training document on each query."""

    query: DataConfig = field(default_factory=DataConfig)
    """The query set (prompt/completion columns allowed); one score column per query."""

    method: Literal["ekfac", "kfac"] = "ekfac"
    """ekfac: refit eigenvalues in the Kronecker eigenbasis (one more pass); kfac: the plain product."""

    fisher: Literal["true", "empirical"] = "true"
    """true: labels sampled from the model (seeded per document); empirical: the dataset's tokens."""

    fisher_seed: int = 0
    """Seed of the sampled Fisher labels (the same seed gives identical factors and scores)."""

    damping: float = 0.1
    """Damping added to the eigenvalues before inverting (see --damping_mode)."""

    damping_mode: DampingMode = "relative"
    """relative: damping times each module's mean eigenvalue (default 0.1: scale-free); absolute: as given."""

    factor_dtype: Literal["float32", "float64"] = "float32"
    """Accumulation dtype of the covariances and scores (eigendecompositions are always float64)."""

    per_module_scores: bool = False
    """Also write each module's share of the scores (per_module.npz; they sum to the total)."""

    query_rank: int = 0
    """0: keep each preconditioned query gradient in full; r > 0: its best rank-r approximation
    per module (truncated SVD; the relative error is recorded in queries/factors.json), so that
    many queries share one cheap pass over the training data."""

    projected_queries: bool = False
    """Also write query_store/: the preconditioned queries projected with --projection_dim and
    --projection_seed like `bergson build`, for `bergson score --query_path` against a projected
    store (no preconditioner is applied again)."""

    top_k: int = 10
    """Training documents printed per query."""


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

    momentum: float = 0.9
    """SGD momentum (0: plain SGD)."""

    weight_decay: float = 0.0
    """Weight decay (decoupled for AdamW, added to the gradient for SGD)."""

    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule after warmup (linear and cosine decay to 0 at the last step)."""

    warmup_steps: int = 0
    """Steps of linear warmup from 0."""

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
class MagicConfig(ModelOptions):
    """Options of ``bergson magic``: exact metagradients of a query loss through a fine-tuning run."""

    run_path: str = ""
    """Output directory: checkpoints, the fine-tuned model, scores and timings."""

    data: DataConfig = field(default_factory=DataConfig)
    """The training documents (each data option may also be written without the 'data.' prefix)."""

    query: DataConfig = field(default_factory=DataConfig)
    """The query documents whose loss after training is attributed."""

    training: TrainingConfig = field(default_factory=TrainingConfig)
    """The fine-tuning recipe."""

    query_mode: Literal["aggregate", "individual"] = "aggregate"
    """aggregate: one score column for the mean query loss (one reverse pass); individual: a
    column per query (one reverse pass each)."""

    per_token: bool = False
    """Also keep each training token's score as the scores store's token rows (they sum to the
    document's score; GradientStore.token_rows)."""

    checkpoints: Literal["every", "sqrt", "log"] = "sqrt"
    """Which training states the forward pass saves: every step; every ~sqrt(T) steps (the reverse
    pass replays each segment once); or a logarithmic set (0, T/2, 3T/4, ...; the reverse pass
    bisects each segment, replaying O(T log T) steps with O(log T) states in memory)."""

    memory_budget_gb: float = 2.0
    """Replayed states are kept in memory up to this size and spill to disk beyond it."""

    force_low_precision: bool = False
    """Allow bf16/fp16 weights (metagradients in half precision are mostly rounding noise)."""

    overwrite: bool = False
    """Start over instead of resuming a run found at run_path."""

    top_k: int = 10
    """Training documents printed per score column."""

    nproc_per_node: int = 1
    """Data-parallel worker processes to start on this machine, each taking its share of every batch (under torchrun, its flags decide)."""

    dist_timeout: float = 7200.0
    """Seconds a worker waits for the others at a barrier or reduction before failing."""


@dataclass
class ModelConfigTestConfig(ModelOptions):
    """Options of ``bergson test_model_configuration``: are batched gradients equal to one-by-one ones?"""

    data: DataConfig = field(default_factory=DataConfig)
    """Documents to test (default: 8 built-in English sentences), cut to --data.max_length (default 256) tokens."""

    num_documents: int = 8
    """How many documents to test (at least 2; they are batched together)."""

    projection_dim: int = 16
    """Random projection size p of the compared gradient vectors (0: full gradients)."""

    tolerance: float = 1e-3
    """Largest accepted relative error ||v_batched - v_alone|| / ||v_alone|| of any document's vector."""

    modules: list[str] = field(default_factory=list)
    """Glob patterns of module names to track (default: every supported layer)."""

    output: str | None = None
    """Also write the report as JSON to this file."""


@dataclass
class ValidateConfig:
    """Options of ``bergson validate``: check scores against real retraining without subsets."""

    run_path: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="RUN_PATH")] = ""
    """Output directory of the report (validation.json)."""

    recipe: str = ""
    """The training run to replay: a `bergson magic` config YAML or run directory."""

    scores: list[str] = field(default_factory=list)
    """Scores stores to check (rows = training documents, one column per query or one in total)."""

    protocol: Literal["leave_k_out", "lds"] = "leave_k_out"
    """leave_k_out: remove a random --fraction of the documents, same order and seed otherwise;
    lds: keep a random half (the classical linear datamodeling score)."""

    fraction: float = 0.05
    """Share of the training documents removed in each leave_k_out subset."""

    num_subsets: int = 20
    """Number of subsets (one retraining each; cached and reused across methods)."""

    seed: int = 0
    """Seed of the subsets."""

    cache_dir: str = ""
    """Where retrains are cached (default: RECIPE_RUN/retrains, or RUN_PATH/retrains)."""

    device: str = "auto"
    """Device to retrain on."""


@dataclass
class ReportConfig:
    """Options of ``bergson report``: one self-contained HTML page of the most influential documents."""

    source: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="SOURCE")] = ""
    """A scores store (from score, ekfac, trackstar, magic) or query results (.jsonl/.csv/.parquet
    written by ``bergson query --output``)."""

    output: str = "report.html"
    """The HTML file to write."""

    top_k: int = 10
    """Proponents and opponents shown per query (a scores store; query results show what they hold)."""

    index: str | None = None
    """With query results: the gradient store they were searched in (for its manifest and the full
    training texts)."""

    queries: str | None = None
    """With query results: the query texts (a dataset whose rows are the queries, in order)."""

    query_column: str = "text"
    """Column of --queries holding the query text."""

    max_queries: int | None = None
    """Report only the first N queries (score columns)."""

    collapse_chars: int = 600
    """Documents longer than this many characters are shown collapsed."""

    bins: int = 30
    """Bins of each query's score histogram."""

    title: str = "bergson report"
    """The page title."""


@dataclass
class ServeConfig(ModelOptions):
    """Options of ``bergson serve``: a local page that answers typed queries from a gradient store."""

    index: str = ""
    """Gradient store to search (from ``bergson build``); opened read-only."""

    host: str = "127.0.0.1"
    """Address to bind (the default serves this machine only)."""

    port: int = 8000
    """Port to listen on (0 picks a free one)."""

    top_k: int = 10
    """Proponents and opponents shown per query."""

    unit_norm: bool = False
    """Score by cosine similarity instead of the raw gradient inner product."""

    per_token: bool = False
    """Split each hit's score over the query's tokens (and the training document's, when the store
    was built with --per_token)."""

    preconditioner_path: str | None = None
    """Preconditioner directory, as for ``bergson query``."""

    max_query_chars: int = 2000
    """Longer queries are refused with a message in the page."""

    max_waiting: int = 16
    """Requests that may wait for the model at once; more are answered 'busy, retry'."""

    collapse_chars: int = 600
    """Documents longer than this many characters are shown collapsed."""
