"""``bergson trak``: TRAK (Park et al. 2023, "TRAK: Attributing Model Behavior at Scale") over an
ensemble of models.

For each model m of the ensemble, with Φ_m (N x k) the projected per-document loss gradients of
the training set, Φ_q (M x k) those of the queries and Q_m = diag(q) the output weights,

    S_m = Q_m Φ_m (Φ_mᵀ Φ_m + λ I)⁻¹ Φ_qᵀ        (N training rows x M queries)

and the scores are the mean of the S_m. q_n = 1 - exp(-ℓ_n), ℓ_n the document's mean next-token
loss: 1 - p with p the geometric mean of its token probabilities, TRAK's Q = 1 - p of the
classification margin carried over to a sequence as in the paper's language-model experiments.
λ is --damping (relative: times the mean eigenvalue of Φ_mᵀΦ_m). When N < k the same scores
come from the N x N form Q Φ Φᵀ (Φ Φᵀ + λ I)⁻¹ ... (push-through identity), so a wide
projection costs an N x N solve instead of a k x k one.

Per token (--per_token): document n's gradient is the sum of its tokens' projected terms,
φ_n = Σ_t φ_{n,t} (the token rows of a `bergson build --per_token` store), so its score splits
into token t's share q_n φ_{n,t}ᵀ (Φᵀ Φ + λ I)⁻¹ φ_q, and the shares of a document add up to its
score up to the storage rounding of the token rows: the training stores TRAK builds per token are
float32 (a float16 store given with --stores adds float16's rounding, about 1e-2 of the largest
score). The k-vectors (ΦᵀΦ + λI)⁻¹ φ_q come from
the k x k solve, or, when N < k, from the N x N one by the Woodbury identity
(ΦᵀΦ + λI)⁻¹ = (I - Φᵀ (Φ Φᵀ + λ I)⁻¹ Φ) / λ. The ensemble's token rows are the mean of the
models' (which must split every document into the same tokens).

Steps under the run directory (each skipped when complete, so a killed run resumes):

    model_<i>/train/    the training store of model i (absent when --stores gives it)
    model_<i>/query/    the query store of model i
    model_<i>/scores/   model i's scores (a scores store)
    scores/             the ensemble mean (a scores store: `bergson report` reads it)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import distributed
from ..config import IndexConfig, TrakConfig, options_of
from ..errors import BergsonError
from ..models import find_tracked_modules, honours_numerics, load_model
from ..runs.documents import load_docs, token_budget, validate_index_config
from ..runs.manifests import make_manifest
from ..runs.rundir import RunDir
from ..runs.shared_store import write_store
from ..store import GradientStore, load_gradients
from ..store.manifest import check_compatible
from ..store.scores import save_score_matrix

logger = logging.getLogger(__name__)

CONFIG_FILE = "trak.yaml"
Q_FORM = (
    "1 - exp(-mean token loss) per training document (TRAK's 1 - p, p the geometric mean token probability)"
)


def output_weights(losses: np.ndarray, loss_tokens: np.ndarray, reduction: str) -> np.ndarray:
    """TRAK's Q for the next-token loss: 1 - exp(-mean token loss) of each document (0 for a
    document without loss tokens)."""
    mean = np.asarray(losses, np.float64)
    if reduction == "sum":
        mean = mean / np.maximum(np.asarray(loss_tokens, np.float64), 1)
    return np.where(np.asarray(loss_tokens) > 0, -np.expm1(-mean), 0.0)


def _operands(
    train: np.ndarray, queries: np.ndarray, damping: float, damping_mode: str
) -> tuple[np.ndarray, np.ndarray, float]:
    """Φ and Φ_q in float64 (refused when their columns differ) and λ: ``damping``, times the mean
    eigenvalue trace(ΦᵀΦ)/k when ``damping_mode`` is relative."""
    phi = np.asarray(train, np.float64)
    phi_q = np.asarray(queries, np.float64)
    k = phi.shape[1]
    if phi_q.shape[1] != k:
        raise BergsonError(f"query vectors have {phi_q.shape[1]} columns and training vectors {k}")
    lam = damping * (float(np.einsum("ij,ij->", phi, phi)) / k if damping_mode == "relative" else 1.0)
    return phi, phi_q, lam


def trak_scores(
    train: np.ndarray,
    queries: np.ndarray,
    weights: np.ndarray,
    damping: float = 0.1,
    damping_mode: str = "relative",
) -> np.ndarray:
    """One model's TRAK scores, [N training rows, M queries], in float64:
    diag(weights) Φ (ΦᵀΦ + λI)⁻¹ Φ_qᵀ with Φ = ``train`` (N x k) and Φ_q = ``queries`` (M x k);
    λ = ``damping`` (``relative``: times the mean eigenvalue trace(ΦᵀΦ)/k)."""
    phi, phi_q, lam = _operands(train, queries, damping, damping_mode)
    n, k = phi.shape
    try:
        if k <= n:
            gram = phi.T @ phi
            gram[np.diag_indices(k)] += lam
            out = phi @ np.linalg.solve(gram, phi_q.T)
        else:
            gram = phi @ phi.T
            gram[np.diag_indices(n)] += lam
            out = np.linalg.solve(gram, phi @ phi_q.T)
    except np.linalg.LinAlgError as e:
        raise BergsonError(
            f"--damping {damping}: the projected Gauss-Newton matrix is singular ({e}); use a damping > 0"
        ) from e
    return np.asarray(weights, np.float64)[:, None] * out


def trak_directions(
    train: np.ndarray, queries: np.ndarray, damping: float = 0.1, damping_mode: str = "relative"
) -> np.ndarray:
    """(ΦᵀΦ + λI)⁻¹ Φ_qᵀ, [k, M] in float64 (λ as in :func:`trak_scores`): the vectors a training
    token's projected gradient is dotted with to give its share of the score. When N < k the k x k
    matrix is never formed: (ΦᵀΦ + λI)⁻¹ = (I - Φᵀ (ΦΦᵀ + λI)⁻¹ Φ) / λ, an N x N solve."""
    phi, phi_q, lam = _operands(train, queries, damping, damping_mode)
    n, k = phi.shape
    if k > n and not lam > 0:
        raise BergsonError(
            f"--damping {damping} with --per_token: {n} documents and {k} projected columns leave "
            "ΦᵀΦ singular, so the tokens' shares are undefined; use a damping > 0"
        )
    try:
        if k <= n:
            gram = phi.T @ phi
            gram[np.diag_indices(k)] += lam
            return np.linalg.solve(gram, phi_q.T)
        gram = phi @ phi.T
        gram[np.diag_indices(n)] += lam
        return (phi_q.T - phi.T @ np.linalg.solve(gram, phi @ phi_q.T)) / lam
    except np.linalg.LinAlgError as e:
        raise BergsonError(
            f"--damping {damping}: the projected Gauss-Newton matrix is singular ({e}); use a damping > 0"
        ) from e


def trak_token_scores(
    store: GradientStore, order: np.ndarray, directions: np.ndarray, weights: np.ndarray
) -> list[np.ndarray]:
    """Each training row's token shares [length, M], in dataset-row order: q_n φ_{n,t}ᵀ V with
    φ_{n,t} the token rows of ``store`` (row ``order[j]`` is dataset row j) and V = ``directions``."""
    return [
        float(weights[j]) * (np.asarray(store.token_rows(int(i)), np.float64) @ directions)
        for j, i in enumerate(order)
    ]


def _ordered(store: GradientStore) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The store's vectors (float64) and losses in dataset-row order, and that order."""
    order = np.argsort(np.asarray(store.rows["row_id"]), kind="stable")
    return (
        np.asarray(store.all, np.float64)[order],
        np.asarray(store.rows["loss"], np.float64)[order],
        order,
    )


def _complete(path: Path) -> bool:
    try:
        return load_gradients(path).manifest.status == "complete"
    except BergsonError:
        return False


def _check_store(store: GradientStore, expected: Any, path: str, model: str, rows: int) -> None:
    """Refuse a --stores entry that is not the training store of ``model`` as this run would build it."""
    m = store.manifest
    if m.kind != "gradients" or m.status != "complete":
        raise BergsonError(
            f"--stores {path}: a {m.status} {m.kind} store; give a complete per-document store from `bergson build`"
        )
    check_compatible(expected, m, f"model {model} with this run's options", f"--stores {path}")
    for key, what in (("unit_normalize", "unit-normalized rows"), ("preconditioner", "a preconditioner")):
        if getattr(m, key):
            raise BergsonError(
                f"--stores {path}: built with {what}; TRAK needs the plain projected gradients"
            )
    if expected.per_token and not store.has_tokens:
        raise BergsonError(
            f"--stores {path}: it has no token rows, which --per_token needs; rebuild it with "
            "`bergson build --per_token` (or drop --per_token)"
        )
    if m.loss != expected.loss:
        raise BergsonError(f"--stores {path}: its loss {m.loss} differs from this run's {expected.loss}")
    if len(store) != rows or m.data.get("tokens_sha256") != expected.data.get("tokens_sha256"):
        raise BergsonError(
            f"--stores {path}: built on other documents ({m.data.get('dataset')!r}, {len(store)} rows) than "
            f"this run's --dataset {expected.data.get('dataset')!r} ({rows} rows) as tokenized here; build it "
            "with the same data options (split, truncation, max_length, ...)"
        )


def _model_scores(cfg: TrakConfig, index: int, name: str, root: Path, run_dir: RunDir) -> None:
    """Model ``index``'s stores (built, or taken from --stores) and its scores store."""
    sub = root / f"model_{index}"
    # per token, the training store keeps float32 rows, so that its token rows sum to its rows (and
    # the tokens' shares to the document scores) to float32 rounding, not float16's
    dtype = "float32" if cfg.per_token else "auto"
    icfg = options_of(
        IndexConfig, cfg, model=name, run_path=str(sub / "train"), overwrite=False, save_dtype=dtype
    )
    model, tokenizer = load_model(icfg)
    max_tokens = token_budget(icfg, model)
    pad = tokenizer.pad_token_id
    docs = load_docs(cfg.data, tokenizer, max_tokens)
    start = time.perf_counter()
    if cfg.stores:
        modules = find_tracked_modules(
            model,
            cfg.modules,
            include_output_head=cfg.include_output_head,
            track_experts=cfg.tracked_experts(),
        )
        expected = make_manifest(icfg, model, modules, docs, max_tokens)
        train_path = Path(cfg.stores[index])
        _check_store(load_gradients(train_path), expected, str(train_path), name, len(docs))
        logger.info("trak: model %d (%s) reuses the training store %s", index, name, train_path)
    else:
        train_path = sub / "train"
        if cfg.per_token and distributed.rank() == 0:
            logger.info(
                "trak: --per_token: model %d's training store is written in float32 (its token rows)", index
            )
        if not distributed.broadcast(_complete(train_path)):
            write_store(icfg, model, docs, max_tokens, pad)
    qcfg = options_of(
        IndexConfig,
        cfg,
        model=name,
        run_path=str(sub / "query"),
        data=cfg.query,
        overwrite=False,
        per_token=False,
    )
    if not distributed.broadcast(_complete(sub / "query")):
        qdocs = load_docs(cfg.query, tokenizer, max_tokens, option="--query.dataset")
        write_store(qcfg, model, qdocs, max_tokens, pad)
    distributed.barrier(f"the end of trak's passes of model {index}")

    def solve() -> None:
        train = load_gradients(train_path)
        phi, losses, order = _ordered(train)
        phi_q, _, _ = _ordered(load_gradients(sub / "query"))
        reduction = str(train.manifest.loss.get("reduction", cfg.loss_reduction))
        weights = output_weights(losses, docs.num_loss_tokens(), reduction)
        scores = trak_scores(phi, phi_q, weights, cfg.damping, cfg.damping_mode)
        tokens = None
        if cfg.per_token:
            directions = trak_directions(phi, phi_q, cfg.damping, cfg.damping_mode)
            tokens = trak_token_scores(train, order, directions, weights)
        info = _info(cfg, [name], [str(train_path)])
        save_score_matrix(sub / "scores", scores, train.manifest, info, overwrite=True, tokens=tokens)
        run_dir.record(f"model_{index}", start)

    if not distributed.broadcast(_complete(sub / "scores")):
        distributed.on_rank_zero(solve, f"solving trak's scores of model {index}")
        distributed.barrier(f"trak's scores of model {index}")


def _info(cfg: TrakConfig, models: list[str], stores: list[str]) -> dict[str, Any]:
    return {
        "method": "trak",
        "mode": "individual",
        "query_dataset": cfg.query.dataset,
        "unit_normalize": False,
        "models": models,
        "train_stores": stores,
        "damping": cfg.damping,
        "damping_mode": cfg.damping_mode,
        "output_weights": Q_FORM,
    }


def _mean_token_rows(stores: list[GradientStore], models: list[str]) -> list[np.ndarray]:
    """The mean over the models' scores stores of each row's token rows (refused when two models
    split a document into different numbers of tokens: their token shares do not line up)."""
    lengths = [np.asarray(s.rows["num_tokens"]) for s in stores]
    for m, other in enumerate(lengths[1:], 1):
        if not np.array_equal(other, lengths[0]):
            row = int(np.flatnonzero(other != lengths[0])[0])
            raise BergsonError(
                f"--per_token: models {models[0]} and {models[m]} split document {row} into "
                f"{lengths[0][row]} and {other[row]} tokens, so their token scores cannot be averaged; "
                "use models that share a tokenizer, or drop --per_token (each model's own token scores "
                "are in model_<i>/scores)"
            )
    return [
        np.mean([np.asarray(s.token_rows(i), np.float64) for s in stores], axis=0)
        for i in range(len(stores[0]))
    ]


def ensemble(cfg: TrakConfig) -> list[str]:
    """The models of the ensemble (--models, or the one --model), refusing inconsistent options."""
    if cfg.models and cfg.model:
        raise BergsonError(
            "--model and --models: give the ensemble with --models (or one model with --model)"
        )
    models = list(cfg.models) or ([cfg.model] if cfg.model else [])
    if not models:
        raise BergsonError("--models (or --model) is required: the model(s) to attribute")
    if cfg.stores and len(cfg.stores) != len(models):
        raise BergsonError(
            f"--stores: {len(cfg.stores)} stores for {len(models)} models; give one training store per model, "
            "in --models order"
        )
    return models


@distributed.entry(lambda cfg: load_gradients(Path(cfg.run_path) / "scores"))
@honours_numerics
def trak(cfg: TrakConfig) -> GradientStore:
    """Run (or resume) TRAK over the ensemble of ``cfg.models``; returns the scores store of the
    ensemble mean (each model's own scores are in ``model_<i>/scores``)."""
    models = ensemble(cfg)
    validate_index_config(cfg)
    if not cfg.query.dataset:
        raise BergsonError("--query.dataset is required: the queries to explain")
    run_dir = RunDir(
        cfg,
        command="trak",
        what="a TRAK run",
        config_file=CONFIG_FILE,
        outputs=(*(f"model_{i}" for i in range(len(models))), "scores"),
        shared="each model's scores are solved on rank 0 from the stores every rank wrote there",
    ).prepare()
    root = run_dir.root
    for i, name in enumerate(models):
        logger.info("trak: model %d of %d: %s", i + 1, len(models), name)
        _model_scores(cfg, i, name, root, run_dir)

    def average() -> None:
        stores = [load_gradients(root / f"model_{i}" / "scores") for i in range(len(models))]
        mean = np.mean([np.asarray(s["scores"], np.float64) for s in stores], axis=0)
        train_stores = [str(p) for p in cfg.stores] or [
            str(root / f"model_{i}" / "train") for i in range(len(models))
        ]
        info = {**_info(cfg, models, train_stores), "ensemble_size": len(models)}
        tokens = _mean_token_rows(stores, models) if cfg.per_token else None
        save_score_matrix(root / "scores", mean, stores[0].manifest, info, overwrite=True, tokens=tokens)

    if not distributed.broadcast(_complete(root / "scores")):
        distributed.on_rank_zero(average, "averaging trak's scores")
        distributed.barrier("the end of trak")
    return load_gradients(root / "scores")
