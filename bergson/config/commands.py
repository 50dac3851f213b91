"""The config of every command, composed of the option groups it reads.

Bases are listed from the last group shown in ``--help`` to the first (a dataclass lists the
fields of its bases in reverse order of inheritance), so ``run_path`` and the model come first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

import tyro

from ..errors import BergsonError
from .options import (
    CollectOptions,
    DampingOptions,
    DataConfig,
    FaissConfig,
    ModelOptions,
    NormalizerOptions,
    PassOptions,
    PreconditionerOptions,
    QueryDataOptions,
    StoreOptions,
    TrainingConfig,
    WorkerOptions,
    share_tokenizer,
)


@dataclass
class IndexConfig(
    PreconditionerOptions,
    NormalizerOptions,
    StoreOptions,
    PassOptions,
):
    """Options of ``bergson build``: collect per-document gradients into a store."""


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

    unit_normalize: Annotated[bool, tyro.conf.arg(aliases=("--unit_norm",))] = False
    """Score by cosine similarity instead of the raw gradient inner product."""

    reverse: bool = False
    """Return the most negative scores (opponents) instead of the most positive."""

    modules: list[str] = field(default_factory=list)
    """Search only these modules of the store (default: all)."""

    output: str | None = None
    """Write the hits to a .jsonl, .csv or .parquet file."""

    record: str | None = None
    """A CSV file each query appends its top and bottom hits to, as it is answered (columns query,
    direction, result, result_index, score: the original package's --record)."""

    search: Literal["exact", "faiss"] = "exact"
    """exact: stream the whole store; faiss: an approximate index built beside the store."""

    faiss: FaissConfig = field(default_factory=FaissConfig)
    """FAISS index options (with --search faiss)."""

    int8_rerank: int = 0
    """0: exact search. F >= 1: scan an int8 copy of the rows (a scale per row; written once beside
    the store), keep the top_k * F best by those scores and re-score them exactly (faster at many
    queries; may miss a row)."""

    int8_prefilter: bool = False
    """Exact search through an int8 copy of the rows (written once beside the store): every row's
    score is bounded from the integer products, and only rows that could still be in the top_k are
    re-scored in float32. Same results as the float32 scan, faster at many queries."""

    preconditioner_path: str | None = None
    """Preconditioner directory: queries get H^-1 (with --unit_normalize, H^-1/2; the index must then carry
    H^-1/2, i.e. be built with the same --preconditioner_path). A preconditioner the index carries is
    used without this option."""

    snippet_chars: int = 160
    """Characters of each training document shown and written."""

    per_token: bool = False
    """Split each hit's score over tokens: the query's, and the training document's when the store
    was built with --per_token (printed: the top few; written: all)."""


@dataclass
class PreconditionerConfig(
    DampingOptions,
    NormalizerOptions,
    PassOptions,
):
    """Options of ``bergson preconditioner``: fit (or mix) per-module gradient second moments."""

    index: str | None = None
    """Fit on the vectors of this existing gradient store instead of computing gradients of --dataset."""

    max_documents: int | None = None
    """Fit on a random sample of this many documents of --dataset (default: all)."""

    sample_seed: int = 0
    """Seed of the --max_documents sample."""

    mix_train: str | None = None
    """With --mix_query: mix two fitted preconditioners (TrackStar) instead of fitting one."""

    mix_query: str | None = None
    """Preconditioner fitted on the query set, mixed with --mix_train."""

    downweight_components: int = 10
    """Mixing: the query weight is set so that this many top query components outweigh every
    training direction (clipped to the query moment's rank)."""

    shard_preconditioners: bool = False
    """With several workers, each rank owns a share of the modules' blocks: the second moments are
    summed onto their owner, eigendecomposed there and saved as one part file per rank, so the
    statistics held per rank after collection are about 1/workers of the whole (one process: no
    effect, said on the console)."""


@dataclass
class TrackstarConfig(
    DampingOptions,
    QueryDataOptions,
    NormalizerOptions,
    StoreOptions,
    PassOptions,
):
    """Options of ``bergson trackstar``: normalizer, mixed preconditioner and cosine scores in one run."""

    query: DataConfig = field(default_factory=DataConfig)
    """The query set (prompt/completion columns allowed)."""

    unit_normalize: bool = True
    """Score by cosine of the preconditioned vectors (TrackStar); --no_unit_normalize for dot products."""

    stats_documents: int | None = 1000
    """Training documents sampled for the training-set second moment (None or 0: all)."""

    sample_seed: int = 0
    """Seed of the --stats_documents sample."""

    downweight_components: int = 10
    """How many top query components the mixed preconditioner down-weights (0: no mixing, use
    the training-set preconditioner alone)."""

    top_k: int = 10
    """Training documents listed per query in the summary."""


@dataclass
class TrakConfig(DampingOptions, QueryDataOptions, PassOptions):
    """Options of ``bergson trak``: TRAK scores (projected Gauss-Newton, output weights) averaged
    over an ensemble of models."""

    query: DataConfig = field(default_factory=DataConfig)
    """The query set (prompt/completion columns allowed); one score column per query."""

    models: list[str] = field(default_factory=list)
    """The ensemble: several model directories or hub ids (independent seeds or checkpoints),
    all tracked and projected alike; the scores are the mean of each model's. --model gives one."""

    stores: list[str] = field(default_factory=list)
    """Training-set gradient stores already built with `bergson build`, one per model in --models
    order, used instead of computing them (each must match its model, modules and projection)."""

    per_token: bool = False
    """Also write each training token's score (the scores stores' token rows; they sum to the
    document's score); the training stores are built with --per_token (given --stores must be)."""


@dataclass
class EkfacConfig(DampingOptions, QueryDataOptions, CollectOptions):
    """Options of ``bergson ekfac``: EK-FAC influence of every training document on each query."""

    per_token: bool = False
    """Also write each training token's score (the scores store's token rows; they sum to the
    document's score)."""

    method: Literal["ekfac", "kfac"] = "ekfac"
    """ekfac: refit eigenvalues in the Kronecker eigenbasis (one more pass); kfac: the plain product."""

    fisher: Literal["true", "empirical"] = "true"
    """true: labels sampled from the model (seeded per document); empirical: the dataset's tokens."""

    fisher_seed: int = 0
    """Seed of the sampled Fisher labels (the same seed gives identical factors and scores)."""

    fisher_samples: int = 1
    """Label draws per document for the true Fisher, averaged: each pass under sampled labels runs once
    per draw (less noise in the factors and in --ihvp's products, at that many times the passes)."""

    factor_dtype: Literal["float32", "float64"] = "float32"
    """Precision of the covariances and scores (float32 factors 2048 wide or more are eigendecomposed in float32)."""

    per_module_scores: bool = False
    """Also write each module's share of the scores (per_module.npz; they sum to the total)."""

    query_rank: int = 0
    """0: keep each preconditioned query gradient in full; r > 0: its best rank-r approximation
    per module (truncated SVD; the relative error is recorded in queries/factors.json), so that
    many queries share one cheap pass over the training data."""

    ihvp: Literal["ekfac", "astra", "lissa", "pcg"] = "ekfac"
    """The inverse-Fisher-vector product of the queries: ekfac, EK-FAC's own; astra, iterations on the
    Fisher preconditioned by EK-FAC (one step equals ekfac, more converge to the exact damped
    inverse); lissa, the same iterations without the preconditioner (many more steps); pcg,
    conjugate gradients preconditioned by EK-FAC (fewer steps than astra; every document each step)."""

    ihvp_steps: int = 10
    """Iterations of --ihvp astra, lissa or pcg (each after astra's first is one pass over a batch of
    training documents)."""

    ihvp_batch_size: int = 0
    """Training documents drawn (seeded by --ihvp_seed) for each iteration's Fisher-vector
    product; 0: all of them (the exact product)."""

    ihvp_step_size: float = 0.0
    """0: each step's length by an exact line search on the batch's quadratic (never diverges on a
    full batch); > 0, a fixed step: astra, the multiple of EK-FAC's step after the first (which is
    EK-FAC's answer); lissa, a multiple of 1 / (largest EK-FAC eigenvalue + damping). A diverging
    iteration is refused with a message."""

    ihvp_seed: int = 0
    """Seed of the documents drawn for each iteration with --ihvp_batch_size."""

    projected_queries: bool = False
    """Also write query_store/: the preconditioned queries projected with --projection_dim and
    --projection_seed like `bergson build`, for `bergson score --query_path` against a projected
    store (no preconditioner is applied again)."""

    top_k: int = 10
    """Training documents printed per query."""


@dataclass
class MagicConfig(WorkerOptions, ModelOptions):
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
    column per query (reverse passes of up to --query_batch_size columns each)."""

    query_batch_size: int = 8
    """Score columns carried through one reverse pass (each step's replay, forward and gradient
    are shared by them); each column holds a cotangent as large as the training state."""

    per_token: bool = False
    """Also keep each training token's score as the scores store's token rows (they sum to the
    document's score; GradientStore.token_rows)."""

    checkpoints: Literal["every", "sqrt", "log"] = "sqrt"
    """Which training states the forward pass saves: every step; every ~sqrt(T) steps (the reverse
    pass replays each segment once); or a logarithmic set (0, T/2, 3T/4, ...; the reverse pass
    bisects each segment, replaying O(T log T) steps with O(log T) states in memory)."""

    memory_budget_gb: float = 2.0
    """Memory for the reverse pass: the scheduled states up to half of it (spilling to disk
    beyond), and a sqrt segment's replayed steps with their graphs up to the other half (then
    their states alone)."""

    force_low_precision: bool = False
    """Allow bf16/fp16 weights (metagradients in half precision are mostly rounding noise)."""

    overwrite: bool = False
    """Start over instead of resuming a run found at run_path."""

    top_k: int = 10
    """Training documents printed per score column."""

    save_checkpoints: int = 0
    """Also save N evenly spaced training checkpoints (the last is the final step) as Hugging Face
    model directories RUN/trainer/checkpoint-<step>/ with optimizer.pt (0: none)."""

    unroll_steps: int = 0
    """Differentiate through the last N training steps only (0: the whole run). Truncated MAGIC:
    the state N steps before the end is held fixed, so a document counts only through the steps
    that train on it within the last N, and each reverse pass costs about N/T of a full one."""

    def _check(self) -> None:
        self.data._check()
        self.query._check("--query.")
        share_tokenizer(self.data, self.query)
        if self.query_mode == "aggregate" and self.query_batch_size != MagicConfig.query_batch_size:
            raise BergsonError(
                f"--query_batch_size {self.query_batch_size}: it bounds how many score columns of "
                "--query_mode individual share a reverse pass, and aggregate has one column; drop it "
                "or pass --query_mode individual"
            )


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
    """Glob patterns of module names to track (default: every supported layer of the body, not the output head)."""

    track_experts: bool = False
    """Also test the routed experts (one block each) and routers of a mixture-of-experts model, as build does."""

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

    protocol: Literal["leave_k_out", "lds", "top_k"] = "leave_k_out"
    """leave_k_out: remove a random --fraction of the documents, same order and seed otherwise;
    lds: keep a random half (the classical linear datamodeling score); top_k: remove each query's
    --top_k highest-scoring documents and compare the loss change with random removals of as many."""

    fraction: float = 0.05
    """Share of the training documents removed in each leave_k_out subset."""

    num_subsets: int = 20
    """Number of subsets (one retraining each; cached and reused across methods); with top_k: random
    removals of K documents per value of --top_k."""

    top_k: list[int] = field(default_factory=lambda: [10])
    """With --protocol top_k: how many of each query's highest-scoring documents are removed (several
    values: one retraining each per query and store)."""

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

    unit_normalize: Annotated[bool, tyro.conf.arg(aliases=("--unit_norm",))] = False
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


@dataclass
class ConvertConfig:
    """Options of ``bergson convert``: rewrite a store of the original package as one of ours."""

    source: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="SOURCE")] = ""
    """A store written by the original bergson package (info.json, gradients.bin, data.hf)."""

    run_path: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="RUN_PATH")] = ""
    """Where to write the converted store."""

    model: str | None = None
    """Model whose module names and shapes the store gets (default: the one its config.yaml names;
    only its configuration is read)."""

    overwrite: bool = False
    """Replace an existing store at RUN_PATH."""


@dataclass
class VerifyConfig:
    """Options of ``bergson verify``: check every file of a store."""

    store: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="STORE")] = ""
    """The store to check (a directory written by build, score, reduce or a method, or a store of
    the original package)."""


def command_of(cfg: object) -> str:
    """The command whose config ``cfg`` is, by exact class, from the one command table ('' for a
    config no command takes as it is)."""
    from ..core.commands import COMMANDS

    return next((name for name, c in COMMANDS.items() if c.config == type(cfg).__name__), "")


@dataclass
class SourceConfig(DampingOptions, QueryDataOptions, CollectOptions):
    """Options of ``bergson source``: SOURCE (approximate unrolled differentiation) over the
    checkpoints of a training run, one EK-FAC curvature per segment of training."""

    models: list[str] = field(default_factory=list)
    """The checkpoints, in training order, one per segment (with --segment_steps and
    --segment_learning_rates); --model gives one. Not with --segments."""

    segments: list[str] = field(default_factory=list)
    """Hugging Face Trainer output directories (checkpoint-N/ and trainer_state.json), one per
    training stage in order (e.g. pretraining then fine-tuning): the checkpoints, the steps and the
    logged learning rates are read from them. Not with --models."""

    segment_steps: list[int] = field(default_factory=list)
    """With --models: the optimizer steps each checkpoint's segment stands for."""

    segment_learning_rates: list[float] = field(default_factory=list)
    """With --models: the learning rate of each segment's steps."""

    stage_rows: list[str] = field(default_factory=list)
    """With --segments: the rows of --dataset each stage trained on, one START:END range per directory
    (END exclusive; either may be left out), e.g. ':1000' '1000:' for a pretraining stage on the first
    1000 rows and a fine-tune on the rest. A segment fits its curvature on its stage's rows and scores
    only them (the other rows get 0 from it). Default: every stage trained on every row."""

    query_model: str = ""
    """The model whose query gradients are unrolled backwards (default: the last checkpoint)."""

    unroll: Literal["exp", "discrete"] = "exp"
    """How a segment's steps act on the curvature's eigenvalues λ: exp, exp(-λ Σ η) (the SOURCE
    paper's); discrete, Π (1 - η λ) over the segment's steps (exact gradient descent on a quadratic),
    and with it the optimizer's momentum (Adam's first moment, SGD's momentum) when the checkpoints'
    optimizer.pt shows one."""

    step_model: Literal["sgd", "adam"] = "sgd"
    """The optimizer step SOURCE unrolls: sgd, η ∇J with the learning rates as given; adam, η D ∇J with
    D = 1 / (sqrt(v̂) + eps) from each segment's checkpoint's optimizer.pt (Adam moments; frozen within the
    segment, rank-one per module). Either way each checkpoint's optimizer.pt, when present, gives its
    segment's weight decay, and with --unroll discrete its momentum."""

    curvature_scale: float = 0.0
    """The factor from EK-FAC's eigenvalues (Fisher of each document's summed token loss) to the
    Hessian of the objective the learning rates stepped on; 0: automatic, 1 / (mean loss tokens
    per training document), the Hugging Face Trainer's mean token loss."""

    per_token: bool = False
    """Also write each training token's score (the token rows sum to the document's score)."""

    method: Literal["ekfac", "kfac"] = "ekfac"
    """ekfac: refit eigenvalues in each Kronecker eigenbasis (one more pass per segment); kfac: the plain product."""

    fisher: Literal["true", "empirical"] = "true"
    """true: labels sampled from the model (seeded per document); empirical: the dataset's tokens."""

    fisher_seed: int = 0
    """Seed of the sampled Fisher labels."""

    fisher_samples: int = 1
    """Label draws per document for the true Fisher, averaged (as ``bergson ekfac --fisher_samples``)."""

    factor_dtype: Literal["float32", "float64"] = "float32"
    """Precision of the covariances and scores (float32 factors 2048 wide or more are eigendecomposed in float32)."""

    top_k: int = 10
    """Training documents printed per query."""
