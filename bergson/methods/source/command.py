"""``bergson source``: SOURCE over the checkpoints of a training run, stage by stage.

Stages under the run directory (each skipped when complete, so a killed run resumes):

    query_gradients/        the query gradients at --query_model (default: the last checkpoint)
    segment_<l>/covariances/, eigen/, corrected/
                            checkpoint l's EK-FAC curvature (as ``bergson ekfac`` fits it)
    segment_<l>/queries/    R_l q_l ("ihvp", what the training gradients are scored against) and
                            S_l q_l ("passed", the query handed on to segment l - 1)
    segment_<l>/scores/     Σ_modules ⟨R_l q_l, G_{n,l}⟩ for every training document at checkpoint l
                            (a scores store; its float64 values in ``segment_<l>/scores.npz``)
    scores/                 the sum over the segments (a scores store `bergson report` reads)

The segments are processed from the last to the first, so each checkpoint is loaded once. The
passes over the training documents split them among several workers like ``bergson ekfac``'s.

With ``--step_model adam`` each segment's curvature is fitted on C_l ⊙ G (C_l = D_l^{1/2}, Adam's
preconditioner from the checkpoint's optimizer.pt, rank one per module) and the queries are
unrolled in those coordinates (:mod:`.maths`); the stored queries are back in the plain ones, so
the scoring passes are unchanged.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ... import distributed
from ...core.layout import module_shape
from ...data import TokenizedDocs
from ...errors import BergsonError
from ...models import announce_coverage, honours_numerics
from ...transforms.ekfac import Factors
from ...transforms.normalizers import AdamNormalizer
from ...transforms.optimizer_state import OPTIMIZER_FILE, normalizers_from_optimizer_state, param_groups_of
from ..ekfac.command import fit_curvature, is_store, pass_options, still_to_do
from ..ekfac.passes import EkfacOptions, query_gradients
from ..ekfac.scoring import Scores, score_documents
from .maths import Curvature, adam_step_preconditioner, unroll_segment
from .segments import Segment, explicit_segments, optimizer_of, segment_momentum, stage_rows, trainer_segments

logger = logging.getLogger(__name__)

SGD_NOTE = (
    "SOURCE models (stochastic) gradient descent: the learning rates are used as they are, without the "
    "optimizer's preconditioning"
)
ADAM_NOTE = (
    "SOURCE models Adam's steps η D m̂, D = 1 / (sqrt(v̂) + eps) from each segment's checkpoint's optimizer.pt: "
    "D frozen within the segment and fitted rank-one per module; the first moment m̂ is modelled with "
    "--unroll discrete (with exp, m̂ is taken as the current gradient)"
)
PRECONDITIONER_FORM = (
    "rank one per module: C = D^{1/2} = sqrt(a) sqrt(b)ᵀ, a_i b_j the row-sum / column-sum fit of "
    "(sqrt(v̂) + eps)^-2 (AdamNormalizer.to_adafactor of (sqrt(v̂) + eps)²)"
)


def adam_states(segments: list[Segment]) -> list[str]:
    """``--step_model adam``: the optimizer.pt of every segment's checkpoint, refusing a checkpoint
    whose directory has none or whose optimizer was not Adam."""
    files = []
    for seg in segments:
        path = Path(seg.checkpoint) / OPTIMIZER_FILE
        if not path.is_file():
            raise BergsonError(
                f"--step_model adam: checkpoint {seg.checkpoint} has no {OPTIMIZER_FILE} (Adam's second moments "
                "give each segment's preconditioner); save the optimizer state with every checkpoint (the "
                "Trainer does unless save_only_model is set), or use --step_model sgd"
            )
        kind = optimizer_of(path)
        if not kind.startswith("adam"):
            raise BergsonError(
                f"--step_model adam: {path} does not hold Adam moments ("
                + (
                    f"its optimizer: {kind}"
                    if kind
                    else "not a torch optimizer state dict torch reads safely"
                )
                + "); use --step_model sgd for a run trained without Adam"
            )
        files.append(str(path))
    return files


def adam_preconditioner(
    path: str, model: Any, modules: Any, include_bias: bool
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """C = D^{1/2} per module from an Adam optimizer.pt, as the pair (on the output [out], on the
    input [in, plus the bias column when the bias is tracked]) of a rank-one C: the row-sum /
    column-sum fit of (sqrt(v̂) + eps)², exact where that is rank one (a uniform v̂ included)."""
    norms = normalizers_from_optimizer_state(path, model, modules, form="adam", include_bias=include_bias)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, norm in norms.items():
        if not isinstance(norm, AdamNormalizer):  # form="adam" always gives one
            raise BergsonError(f"{path}: module {name!r}: no elementwise Adam moments")
        out[name] = adam_step_preconditioner(norm)
    return out


def weight_decay_of(
    checkpoint: str, model: Any, modules: Any, include_bias: bool, required: bool
) -> tuple[dict[str, float | torch.Tensor], bool, dict[str, Any]]:
    """The weight decay of a checkpoint's segment from its optimizer.pt: per module the decay rate (a
    number, or [out, in] when a tracked bias column decays at another rate), whether it is decoupled
    (AdamW's θ -= η W θ) rather than Adam's L2, and what to record. Without an optimizer.pt, or (unless
    ``required``) one that does not fit the model: no decay, and the record says why."""
    path = Path(checkpoint) / OPTIMIZER_FILE
    if not path.is_file():
        return {}, True, {"optimizer_state": None, "note": f"no {OPTIMIZER_FILE}: weight decay not modelled"}
    try:
        groups = param_groups_of(path, model, modules, include_bias)
    except BergsonError as err:
        if required:
            raise
        return {}, True, {"optimizer_state": str(path), "note": f"weight decay not modelled: {err}"}
    decay: dict[str, float | torch.Tensor] = {}
    flags: set[Any] = set()
    rates: set[float] = set()
    for name, (weight, bias) in groups.items():
        wd = float(weight.get("weight_decay") or 0.0)
        flags.add(weight.get("decoupled_weight_decay", "betas" not in weight or None))
        decay[name] = wd
        rates.add(wd)
        column = wd if bias is None else float(bias.get("weight_decay") or 0.0)
        if column != wd:
            rates.add(column)
            out_dim, in_dim = module_shape(modules[name])
            decay[name] = torch.cat(
                [torch.full((out_dim, in_dim), wd), torch.full((out_dim, 1), column)], 1
            ).double()
    decoupled = flags != {False}  # the Trainer's AdamW when an old torch did not record the flag
    record = {
        "optimizer_state": str(path),
        "weight_decay": sorted(rates),
        "decoupled": decoupled,
        "decoupled_from": "assumed (AdamW): the param groups do not say"
        if None in flags
        else "the param groups",
    }
    return decay, decoupled, record


def plan(cfg: Any) -> tuple[list[Segment], list[dict[str, Any]]]:
    """The segments of ``cfg`` (and the stages read from --segments), refusing inconsistent options."""
    explicit = bool(cfg.models or cfg.model or cfg.segment_steps or cfg.segment_learning_rates)
    if cfg.segments and explicit:
        given = [o for o, v in (("--models", cfg.models), ("--model", cfg.model), ("--segment_steps",
                 cfg.segment_steps), ("--segment_learning_rates", cfg.segment_learning_rates)) if v]  # fmt: skip
        raise BergsonError(
            f"--segments with {', '.join(given)}: give the run either as Trainer output directories "
            "(--segments) or as checkpoints with their steps and learning rates (--models, --segment_steps, "
            "--segment_learning_rates), not both"
        )
    if cfg.segments:
        return trainer_segments(list(cfg.segments))
    if cfg.stage_rows:
        raise BergsonError(
            "--stage_rows: it gives the rows each --segments directory (stage) trained on; with --models every "
            "checkpoint's segment scores every row. Drop it, or give the run as Trainer directories"
        )
    if cfg.models and cfg.model:
        raise BergsonError("--model and --models: give the checkpoints with --models (or one with --model)")
    return explicit_segments(list(cfg.models) or ([cfg.model] if cfg.model else []),
                             list(cfg.segment_steps), list(cfg.segment_learning_rates)), []  # fmt: skip


def curvature_scale(cfg: Any, docs: Any) -> tuple[float, str]:
    """The factor from EK-FAC's eigenvalues to the training objective's Hessian, and how it was chosen.

    EK-FAC's Fisher is the mean over documents of the outer products of each document's summed-loss
    gradient: the curvature of (1/N) Σ_n L_n. The Hugging Face Trainer steps on the mean token loss
    of a batch, Σ_n L_n / Σ_n T_n ≈ (1/N) Σ_n L_n / T̄ with T̄ the mean loss tokens per document, so
    its Hessian is EK-FAC's divided by T̄."""
    if cfg.curvature_scale:
        return float(cfg.curvature_scale), "--curvature_scale"
    counts = docs.num_loss_tokens()
    active = counts[counts > 0]
    if len(active) == 0:
        raise BergsonError("--dataset: no training document has a loss token")
    return float(len(active) / active.sum()), "automatic: 1 / mean loss tokens per training document"


def _save_scores(path: Path, result: Any, base: Any, info: dict[str, Any], tokens: bool) -> None:
    from ...store.scores import save_score_matrix

    arrays = {"total": result.total}
    if tokens:
        arrays["tokens"] = np.concatenate(result.per_token) if result.per_token else np.zeros((0, 0))
    np.savez(str(path.parent / "scores.npz"), **arrays)  # float64, beside the (float32) store
    save_score_matrix(path, result.total, base, info, overwrite=True, tokens=result.per_token)


def _holds_momentum(path: Path) -> bool:
    """Whether saved segment queries carry the momentum buffer's cotangent (``passed_momentum``)."""
    return all("passed_momentum" in names for names in Factors.names(path).values())


def _load_scores(path: Path, lengths: np.ndarray) -> tuple[np.ndarray, list[np.ndarray] | None]:
    with np.load(str(path.parent / "scores.npz")) as f:
        total = f["total"]
        if "tokens" not in f:
            return total, None
        flat = f["tokens"]
    bounds = np.cumsum([0, *lengths.tolist()])
    return total, [flat[a:b] for a, b in itertools.pairwise(bounds)]


def _spread(result: Scores, rows: np.ndarray, docs: TokenizedDocs, nq: int) -> Scores:
    """A stage's scores (of ``rows`` of ``docs``) as scores of every document, 0 outside ``rows``."""
    total = np.zeros((len(docs), nq))
    total[rows] = result.total
    tokens = None
    if result.per_token is not None:
        tokens = [np.zeros((n, nq)) for n in docs.lengths]
        for row, values in zip(rows, result.per_token):
            tokens[row] = values
    return Scores(total, {}, tokens)


def _scores_of(cfg: Any) -> Any:
    from ...store import load_gradients

    return load_gradients(Path(cfg.run_path) / "scores")


@distributed.entry(_scores_of)
@honours_numerics
def source(cfg: Any) -> Any:
    """Run (or resume) ``bergson source``; returns the scores store (rows x queries): for each
    training document, the sum over the segments of ⟨R_l q_l, G_{n,l}⟩ (see :mod:`.maths`)."""
    from ...models import find_tracked_modules, load_model
    from ...runs.documents import load_docs, token_budget, validate_index_config
    from ...runs.manifests import make_manifest
    from ...runs.rundir import RunDir
    from ...store import load_gradients

    validate_index_config(cfg)
    if not cfg.query.dataset:
        raise BergsonError("--query.dataset is required: the queries whose influences are wanted")
    if cfg.aggregate_experts:
        raise BergsonError(
            "--aggregate_experts: SOURCE fits one pair of Kronecker factors per expert; drop the option"
        )
    if cfg.data.reward_column or cfg.query.reward_column:
        raise BergsonError("--reward_column: SOURCE scores use the plain next-token loss; drop the option")
    defaults = {f.name: f.default for f in fields(cfg)}
    if cfg.projection_dim != defaults["projection_dim"] or cfg.projection_seed != defaults["projection_seed"]:
        raise BergsonError(
            "--projection_dim / --projection_seed: SOURCE scores full per-module gradients (no projection); "
            "leave them out"
        )
    segments, stages = plan(cfg)
    num = len(segments)
    adam_files = adam_states(segments) if cfg.step_model == "adam" else []
    for seg, file in zip(segments, adam_files):
        seg.notes["optimizer_state"] = file
    run = RunDir(
        cfg,
        command="source",
        what="a SOURCE run",
        config_file="source.yaml",
        outputs=("query_gradients", *(f"segment_{i}" for i in range(num)), "scores"),
        shared="every rank loads the stages rank 0 writes there: the eigenbases, eigenvalues and queries",
    ).prepare()
    root, lead = run.root, run.lead
    optimizers = sorted({str(s["optimizer"]) for s in stages if s.get("optimizer")})
    adam = [o for o in optimizers if "adam" in o.lower()]
    if lead:
        for seg in segments:
            if seg.steps == 0:
                logger.warning(
                    "source: %s stands for no optimizer step; its segment adds nothing", seg.checkpoint
                )
        if adam_files:
            logger.warning("source: --step_model adam. %s", ADAM_NOTE)
        elif adam:
            logger.warning(
                "source: the training run's optimizer was %s. %s; --step_model adam models its preconditioning",
                ", ".join(adam),
                SGD_NOTE,
            )
    momenta = segment_momentum(segments, stages)
    for seg, mom in zip(segments, momenta):
        if mom is not None and cfg.unroll != "discrete":
            mom.update(modelled=False, note="momentum is modelled with --unroll discrete only")
        if mom is not None:
            seg.notes["momentum"] = {k: v for k, v in mom.items() if k != "lrs"}
    if lead:
        shown = {
            (m["form"], m["beta"], m["gain"], m["modelled"], m.get("note")) for m in momenta if m is not None
        }
        for form, beta, gain, modelled, note in sorted(shown, key=str):
            if modelled:
                logger.warning(
                    "source: momentum modelled: the steps follow %s's buffer ν ← %g ν + %g ∇J%s",
                    form,
                    beta,
                    gain,
                    " with the bias correction 1 / (1 - β₁ᵗ) on the rates" if form == "adam" else "",
                )
            else:
                logger.warning("source: the run used %s momentum %g; %s", form, beta, note)
    query_model = cfg.query_model or segments[-1].checkpoint
    if not still_to_do(lambda: is_store(root / "scores")):
        return load_gradients(root / "scores")
    dtype = torch.float64 if cfg.factor_dtype == "float64" else torch.float32
    info: dict[str, Any] = {
        "kind": "source",
        "method": "source",
        "curvature": cfg.method,
        "fisher": cfg.fisher,
        "damping": cfg.damping,
        "damping_mode": cfg.damping_mode,
        "unroll": cfg.unroll,
        "query_model": query_model,
        "segments": [s.record() for s in segments],
        "stages": stages,
        "step_model": cfg.step_model,
        "optimizer_note": (ADAM_NOTE if adam_files else SGD_NOTE)
        + (f" (the run's optimizer: {', '.join(optimizers)})" if optimizers else ""),
        "run": str(root),
    }
    if adam_files:
        info["preconditioner"] = {"form": PRECONDITIONER_FORM, "optimizer_states": adam_files}

    def options(model: Any, tokenizer: Any) -> EkfacOptions:
        modules = find_tracked_modules(
            model,
            cfg.modules,
            include_output_head=cfg.include_output_head,
            track_experts=cfg.tracked_experts(),
        )
        return pass_options(cfg, modules, tokenizer, lead)

    held: dict[str, Any] = {}  # the loaded checkpoint (one at a time) and the tokenized documents

    def load(name: str) -> tuple[Any, Any, int, TokenizedDocs, TokenizedDocs]:
        if held.get("name") != name:
            held.pop("model", None)  # free the previous checkpoint first
            held["model"], held["tokenizer"] = load_model(replace(cfg, model=name))
            held["name"] = name
        model, tokenizer = held["model"], held["tokenizer"]
        max_tokens = token_budget(cfg, model)
        if "docs" not in held:
            held["docs"] = load_docs(cfg.data, tokenizer, max_tokens)
            held["qdocs"] = load_docs(cfg.query, tokenizer, max_tokens, option="--query.dataset")
        return model, tokenizer, max_tokens, held["docs"], held["qdocs"]

    if still_to_do(lambda: Factors.complete(root / "query_gradients")):
        start = time.perf_counter()
        model, tokenizer, _, _, qdocs = load(query_model)
        grads = query_gradients(model, qdocs, options(model, tokenizer))
        distributed.on_rank_zero(
            lambda: Factors(
                {n: {"grads": g} for n, g in grads.items()},
                {"stage": "query_gradients", "queries": len(qdocs), "model": query_model},
            ).save(root / "query_gradients"),
            "saving the query gradients",
        )
        run.record("query_gradients", start)
    passed: dict[str, torch.Tensor] = {
        n: d["grads"] for n, d in Factors.load(root / "query_gradients").tensors.items()
    }
    nq = len(next(iter(passed.values())))
    scale_info: tuple[float, str] | None = None
    scales: dict[int, float] = {}
    decays: dict[int, Any] = {}

    def segment(
        index: int, passed: dict[str, torch.Tensor], passed_m: dict[str, torch.Tensor] | None
    ) -> Factors:
        """Segment ``index``'s curvature, queries and scores (each stage skipped when complete)."""
        nonlocal scale_info, stale
        seg, sub = segments[index], root / f"segment_{index}"
        done_queries = not stale and not still_to_do(lambda: Factors.complete(sub / "queries"))
        mom = momenta[index]
        # queries saved by a bergson that did not model momentum hold no buffer cotangent
        if (
            done_queries
            and mom is not None
            and mom["modelled"]
            and still_to_do(lambda: _holds_momentum(sub / "queries"))
        ):
            logger.warning(
                "source: segment %d's saved queries (%s) were computed without the momentum this run "
                "models (by an older bergson); computing segment %d and the segments before it again",
                index, sub / "queries", index,
            )  # fmt: skip
            stale, done_queries = True, False
        if done_queries and "docs" in held and not still_to_do(lambda: is_store(sub / "scores")):
            done = Factors.load(sub / "queries")  # nothing to compute with this checkpoint
            scales[index], decays[index] = float(done.meta["scale"]), done.meta.get("weight_decay")
            return done
        model, tokenizer, max_tokens, docs, _ = load(seg.checkpoint)
        opts = options(model, tokenizer)
        if scale_info is None:
            scale_info = curvature_scale(cfg, docs)
        rows = stage_rows(list(cfg.stage_rows), len(stages), len(docs))
        mine = None if rows is None else rows[seg.stage]
        sdocs = docs if mine is None else docs.select(mine)  # the rows this segment's stage trained on
        scale = scale_info[0] if mine is None or cfg.curvature_scale else curvature_scale(cfg, sdocs)[0]
        scales[index] = scale
        if not done_queries:
            pre = None
            if adam_files:  # the curvature of C ⊙ G; the scoring pass keeps the plain gradients
                pre = adam_preconditioner(adam_files[index], model, opts.modules, cfg.include_bias)
            fit_opts = opts if pre is None else replace(opts, scales=pre)
            decay, decoupled, decays[index] = weight_decay_of(
                seg.checkpoint, model, opts.modules, cfg.include_bias, required=bool(adam_files)
            )
            if lead:
                logger.warning(
                    "source: segment %d (%s): weight decay %s", index, seg.checkpoint, decays[index]
                )
            eigen, corrected = fit_curvature(
                run, sub, model, sdocs, fit_opts, cfg.method, f"segment_{index}/"
            )
            start = time.perf_counter()
            values = (
                None if corrected is None else {n: d["eigenvalues"] for n, d in corrected.tensors.items()}
            )
            mom = mom if mom is not None and mom["modelled"] else None
            curvature = Curvature(eigen, values, seg.lrs, pre, decay, decoupled)
            if mom is not None:  # SGD's decay joins the gradient before its momentum buffer
                curvature = replace(
                    curvature,
                    lrs=mom["lrs"],
                    momentum=mom["beta"],
                    momentum_gain=mom["gain"],
                    decoupled_weight_decay=decoupled and mom["form"] == "adam",
                )
            product, handed, handed_m = unroll_segment(
                passed, curvature, cfg.damping, cfg.damping_mode, cfg.unroll, scale, momentum_queries=passed_m
            )
            tensors = {n: {"ihvp": product[n].to(dtype), "passed": handed[n]} for n in product}
            if handed_m is not None:
                for n in tensors:
                    tensors[n]["passed_momentum"] = handed_m[n]
            meta = {
                "stage": "queries",
                "queries": nq,
                "segment": seg.record(),
                "scale": scale,
                "weight_decay": decays[index],
            }
            distributed.on_rank_zero(
                lambda: Factors(tensors, meta).save(sub / "queries"), "saving the queries"
            )
            run.record(f"segment_{index}/queries", start)
        queries = Factors.load(sub / "queries")
        if stale or still_to_do(lambda: is_store(sub / "scores")):
            start = time.perf_counter()
            scoring = Factors({n: {"ihvp": d["ihvp"]} for n, d in queries.tensors.items()}, {"queries": nq})
            result = score_documents(model, sdocs, scoring, opts, per_token=cfg.per_token)
            if mine is not None:  # rows outside the stage get 0 from this segment
                result = _spread(result, mine, docs, nq)
            base = make_manifest(
                replace(cfg, model=seg.checkpoint, projection_dim=0), model, opts.modules, docs, max_tokens
            )
            seg_info = {
                **info,
                "mode": "individual",
                "query_dataset": cfg.query.dataset,
                "unit_normalize": False,
                "segment": index,
            }
            distributed.on_rank_zero(
                lambda: _save_scores(sub / "scores", result, base, seg_info, cfg.per_token),
                f"writing segment {index}'s scores",
            )
            run.record(f"segment_{index}/scores", start)
        return queries

    totals: list[np.ndarray] = []
    token_rows: list[list[np.ndarray] | None] = []
    passed_m: dict[str, torch.Tensor] | None = None
    stale = False  # a segment was computed again: the ones before it depend on what it hands them
    for index in reversed(range(num)):
        queries = segment(index, passed, passed_m)
        passed = {n: d["passed"] for n, d in queries.tensors.items()}
        carried = {n: d["passed_momentum"] for n, d in queries.tensors.items() if "passed_momentum" in d}
        passed_m = carried if len(carried) == len(queries.tensors) else None
        if index and segments[index - 1].stage != segments[index].stage:
            passed_m = None  # a new stage starts its optimizer afresh: the buffer is not carried into it
        lengths = np.asarray(held["docs"].lengths)
        total, tokens = _load_scores(root / f"segment_{index}" / "scores", lengths)
        totals.append(total)
        token_rows.append(tokens)
    docs, model, tokenizer = held["docs"], held["model"], held["tokenizer"]
    scores_path = root / "scores"
    start = time.perf_counter()
    scale, how = scale_info if scale_info is not None else curvature_scale(cfg, docs)
    total = np.sum(totals, axis=0)
    per_token = None
    if cfg.per_token:
        per_token = [
            np.sum([rows[i] for rows in token_rows if rows is not None], axis=0) for i in range(len(docs))
        ]
    modules = options(model, tokenizer).modules
    base = make_manifest(
        replace(cfg, model=query_model, projection_dim=0), model, modules, docs, token_budget(cfg, model)
    )
    info.update(
        mode="individual",
        query_dataset=cfg.query.dataset,
        unit_normalize=False,
        curvature_scale=scale,
        curvature_scale_from=how,
        stage_rows=list(cfg.stage_rows),
        segment_curvature_scales=[scales.get(i, scale) for i in range(num)],
        segment_weight_decay=[decays.get(i) for i in range(num)],
        learning_rate_sum=math.fsum(math.fsum(s.lrs) for s in segments),
    )

    def write() -> Any:
        from ...store.scores import save_score_matrix

        announce_coverage(base.model)
        store = save_score_matrix(scores_path, total, base, info, overwrite=True, tokens=per_token)
        run.record("scores", start)
        return store

    store = distributed.on_rank_zero(write, f"writing the scores at {scores_path}")
    return store if store is not None else load_gradients(scores_path)
