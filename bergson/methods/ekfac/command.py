"""EK-FAC influence functions: the collection loop with statistics consumers, stage by stage.

Stages (each saved as safetensors + JSON under the run directory and skipped when complete):

    covariances/   A and S per module (true Fisher: labels sampled from the model, seeded per document)
    eigen/         their eigendecompositions (float64; float32 for float32 factors >= 2048 wide)
    corrected/     EK-FAC eigenvalues: mean squared per-document gradient in the Kronecker eigenbasis
    queries/       inverse-Fisher-vector products of the query gradients, (F + δI)⁻¹ G_q
                   (or their best rank-r approximations, with --query_rank r); with --ihvp astra
                   or lissa, iterations on the Fisher itself (:mod:`.ihvp`), recorded in its metadata
    query_store/   with --projected_queries: those products projected like `bergson build`,
                   an ordinary store that `bergson score --query_path` scores against
    scores/        a scores store, one column per query: Σ_modules ⟨(F + δI)⁻¹ G_q, G_n⟩

``timings.json`` records the seconds each stage took in the run that computed it.

Several workers (``--nproc_per_node N`` or torchrun) split the training documents, whole,
balancing their token counts (:func:`rank_documents`; the same split on every rank). Each
pass over the training data sums over the rank's own documents, then one all-reduce adds
the ranks' sums (covariances, eigenvalue corrections, score rows and token rows, which are
zero outside a rank's documents), so every rank holds the totals and divides by the same
global counts. Rank 0 alone writes the stages (and alone computes the eigendecompositions,
the query products and the query store) while the others wait, then every rank loads what
it wrote, so all ranks use identical eigenbases and queries. Whether a stage is already
complete is decided by rank 0 and broadcast, so a resumed run skips the same stages on
every rank. The true-Fisher labels are seeded per document, so the results do not depend
on the number of workers (up to float rounding of the sums).

Scores are oriented like every bergson score: positive means training on the document
lowers the query's loss.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ... import distributed
from ...core.layout import module_shape
from ...errors import BergsonError
from ...models import announce_coverage, honours_numerics
from ...transforms.ekfac import Factors, eigendecompose
from .ihvp import IhvpOptions, document_products, solve
from .passes import EkfacOptions, fit_corrected_eigenvalues, fit_covariances, query_gradients, rank_documents
from .scoring import precondition_queries, save_query_store, score_documents

logger = logging.getLogger(__name__)

STAGES = ("covariances", "eigen", "corrected", "queries", "query_store", "scores")


def still_to_do(done: Any) -> bool:
    """Whether a stage is still to do, as rank 0 sees it (``done()`` runs there alone and every
    rank gets its answer, so that all ranks skip or run the same stages)."""
    return bool(distributed.broadcast(not done() if distributed.rank() == 0 else None))


def is_store(path: Path) -> bool:
    from ...store import load_gradients

    try:
        load_gradients(path)
    except BergsonError:
        return False
    return True


def fit_curvature(
    run: Any, root: Path, model: Any, docs: Any, opts: EkfacOptions, method: str = "ekfac", prefix: str = ""
) -> tuple[Factors, Factors | None]:
    """The curvature of ``model`` on ``docs`` as stages under ``root`` (each skipped when complete):
    ``covariances/``, ``eigen/`` and, with ``method`` "ekfac", ``corrected/``. Returns the eigenbases
    and the corrected eigenvalues (None for K-FAC), rank 0's, on every rank. ``run`` (a
    :class:`~bergson.runs.rundir.RunDir`) records each stage's seconds as ``prefix + stage``;
    ``bergson ekfac`` fits one curvature, ``bergson source`` one per checkpoint."""
    if still_to_do(lambda: Factors.complete(root / "covariances")):
        start = time.perf_counter()
        covariances = fit_covariances(model, docs, opts)  # summed over the ranks
        distributed.on_rank_zero(lambda: covariances.save(root / "covariances"), "saving the covariances")
        del covariances
        run.record(prefix + "covariances", start)
    if still_to_do(lambda: Factors.complete(root / "eigen")):
        start = time.perf_counter()
        distributed.on_rank_zero(
            lambda: eigendecompose(Factors.load(root / "covariances")).save(root / "eigen"),
            "eigendecomposing the covariances",
        )
        run.record(prefix + "eigen", start)
    eigen = Factors.load(root / "eigen")  # rank 0's, on every rank
    if method != "ekfac":
        return eigen, None
    if still_to_do(lambda: Factors.complete(root / "corrected")):
        start = time.perf_counter()
        fitted = fit_corrected_eigenvalues(model, docs, eigen, opts)  # summed over the ranks
        distributed.on_rank_zero(lambda: fitted.save(root / "corrected"), "saving the corrected eigenvalues")
        del fitted
        run.record(prefix + "corrected", start)
    return eigen, Factors.load(root / "corrected")


def _scores_of(cfg: Any) -> Any:
    from ...store import load_gradients

    return load_gradients(Path(cfg.run_path) / "scores")


def pass_options(cfg: Any, modules: Any, tokenizer: Any, progress: bool) -> EkfacOptions:
    """The EK-FAC passes' options from a command's config (ekfac, source): token budget, padding,
    bias, Fisher labels, their seed and draws, and the accumulation dtype of --factor_dtype."""
    samples = getattr(cfg, "fisher_samples", 1)
    if samples > 1 and cfg.fisher != "true":
        raise BergsonError(
            f"--fisher_samples {samples} with --fisher {cfg.fisher}: the dataset's labels are the same at every "
            "draw; drop --fisher_samples, or use --fisher true"
        )
    return EkfacOptions(
        modules,
        token_batch_size=cfg.token_batch_size,
        pad_token_id=tokenizer.pad_token_id or 0,
        include_bias=cfg.include_bias,
        fisher=cfg.fisher,
        seed=cfg.fisher_seed,
        fisher_samples=samples,
        progress=progress,
        dtype=torch.float64 if cfg.factor_dtype == "float64" else torch.float32,
    )


@distributed.entry(_scores_of)
@honours_numerics
def ekfac(cfg: Any, rescore: Any = None) -> Any:
    """Run (or resume) ``bergson ekfac``; returns the scores store (rows x queries). On
    ``cfg.nproc_per_node`` workers (or the ranks of a torchrun launch) the passes over the
    training documents are split among the ranks and rank 0 writes the stages. ``rescore``
    (:class:`bergson.methods.cascade.Rescore`): the scoring pass runs on its rows alone."""
    from dataclasses import replace

    from ...models import find_tracked_modules, load_model
    from ...runs.documents import load_docs, token_budget, validate_index_config
    from ...runs.manifests import make_manifest
    from ...runs.rundir import RunDir
    from ...store import load_gradients
    from ...store.scores import save_score_matrix

    validate_index_config(cfg)
    if not cfg.query.dataset:
        raise BergsonError("--query.dataset is required: the queries whose influences are wanted")
    if cfg.aggregate_experts:
        raise BergsonError(
            "--aggregate_experts: EK-FAC fits one pair of Kronecker factors per expert, which an aggregated "
            "block has not; drop the option (bergson ekfac tracks experts one block each)"
        )
    if cfg.data.reward_column or cfg.query.reward_column:
        raise BergsonError(
            "--reward_column: EK-FAC scores use the plain next-token loss; advantage-weighted (GRPO) "
            "losses are available in build, score and query, not in bergson ekfac"
        )
    solver = IhvpOptions(cfg.ihvp, cfg.ihvp_steps, cfg.ihvp_batch_size, cfg.ihvp_step_size, cfg.ihvp_seed)
    solver.check()
    run = RunDir(
        cfg,
        command="ekfac",
        what="an EK-FAC run",
        config_file="ekfac.yaml",
        outputs=(*STAGES, "per_module.npz"),
        shared="every rank loads the stages rank 0 writes there: the eigenbases, the corrected eigenvalues "
        "and the preconditioned queries",
    ).prepare()
    root, lead = run.root, run.lead

    model, tokenizer = load_model(cfg)
    max_tokens = token_budget(cfg, model)
    modules = find_tracked_modules(
        model, cfg.modules, include_output_head=cfg.include_output_head, track_experts=cfg.tracked_experts()
    )
    for name, module in modules.items():
        big = max(module_shape(module))
        if big > 4096 and lead:
            logger.warning(
                "%s: a %d x %d covariance factor; its eigendecomposition takes minutes and %.1f GB. "
                "Leave the layer out with --modules if it is not needed",
                name,
                big,
                big,
                big * big * 8 * 3 / 1e9,
            )
    opts = pass_options(cfg, modules, tokenizer, lead)
    info = {
        "kind": "ekfac",
        "method": cfg.method,
        "fisher": cfg.fisher,
        "damping": cfg.damping,
        "damping_mode": cfg.damping_mode,
        "query_rank": cfg.query_rank,
        **solver.record(),
        "run": str(root),
    }
    docs = load_docs(cfg.data, tokenizer, max_tokens)
    if rescore is not None:  # the cascade's candidates, checked before the curvature is fitted
        rescore.select(docs)
    share = rank_documents(docs)
    if share is not None:
        active = np.where(docs.num_loss_tokens() > 0, docs.lengths, 0)
        logger.info(
            "rank %d of %d: %d of %d documents, %s of %s tokens",
            distributed.rank(),
            distributed.world_size(),
            len(share),
            len(docs),
            f"{int(active[share].sum()):,}",
            f"{int(active.sum()):,}",
        )
    eigen, corrected = fit_curvature(run, root, model, docs, opts, cfg.method)
    qdocs = load_docs(cfg.query, tokenizer, max_tokens, option="--query.dataset")
    if still_to_do(lambda: Factors.complete(root / "queries")):
        start = time.perf_counter()

        # every rank takes part in a sharded model's forward and backward passes
        shared = query_gradients(model, qdocs, opts) if distributed.is_sharded(model) else None
        if shared is not None and solver.method != "ekfac":
            raise BergsonError(
                f"--ihvp {solver.method}: its Fisher-vector products run on rank 0 alone, which a model "
                "sharded over the ranks cannot do; use --ihvp ekfac or a model that fits on one device"
            )

        def fit_queries(eigen: Factors, corrected: Factors | None) -> None:
            grads = shared if shared is not None else query_gradients(model, qdocs, opts)
            solved = None
            if solver.method != "ekfac":
                products = document_products(model, docs, opts, solver.batch_size, solver.seed, opts.dtype)
                solved = solve(grads, eigen, corrected, cfg.damping, cfg.damping_mode, solver, products)
                if lead:
                    logger.info(
                        "--ihvp %s: %d steps, relative residual %.3g before the last",
                        solver.method,
                        solver.steps,
                        solved[1]["ihvp_residuals"][-1],
                    )
            precondition_queries(
                grads, eigen, corrected, cfg.damping, cfg.damping_mode, cfg.query_rank, opts.dtype, solved
            ).save(root / "queries")

        distributed.on_rank_zero(partial(fit_queries, eigen, corrected), "preconditioning the queries")
        run.record("queries", start)
    del eigen, corrected
    queries = Factors.load(root / "queries")
    if cfg.projected_queries and still_to_do(lambda: is_store(root / "query_store")):
        start = time.perf_counter()

        def write_query_store() -> None:
            qbase = make_manifest(
                replace(cfg, data=cfg.query, per_token=False), model, modules, qdocs, max_tokens
            )
            save_query_store(
                root / "query_store", queries, qbase, info, cfg.projection_seed, cfg.projection_dim
            )

        distributed.on_rank_zero(write_query_store, "writing the query store")
        run.record("query_store", start)
    scores_path = root / "scores"
    if not still_to_do(lambda: is_store(scores_path)):
        return load_gradients(scores_path)
    start = time.perf_counter()
    scored = docs if rescore is None else docs.select(rescore.rows)
    result = score_documents(model, scored, queries, opts, per_token=cfg.per_token)  # every row, every rank
    if rescore is not None:
        result = rescore.expand(result)

    def write_scores() -> Any:
        if cfg.per_module_scores:
            arrays: dict[str, Any] = dict(result.per_module)
            np.savez(str(root / "per_module.npz"), **arrays)
        base = make_manifest(replace(cfg, projection_dim=0), model, modules, docs, max_tokens)
        if distributed.rank() == 0:
            announce_coverage(base.model)
        score_info = {
            **info,
            "mode": "individual",
            "query_dataset": cfg.query.dataset,
            "unit_normalize": False,
            **({"cascade": rescore.info} if rescore is not None else {}),
        }
        store = save_score_matrix(
            scores_path, result.total, base, score_info, overwrite=True, tokens=result.per_token
        )
        run.record("scores", start)
        return store

    store = distributed.on_rank_zero(write_scores, f"writing the scores at {scores_path}")
    return store if store is not None else load_gradients(scores_path)
