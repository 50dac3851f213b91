"""Fact-tracing benchmark: rank the training documents behind each synthetic fact.

Steps (each timed): generate the corpus (``corpus``), train the tiny model on it unless
``out_dir/model`` already holds a checkpoint of the same data and recipe (``train``), measure
how many facts it recalls, then score every training document for every fact's query with
each method of ``METHODS`` and report MRR and recall@10 of the documents stating the fact
(``metrics``: ties count against the method). Prints one JSON object and writes
``out_dir/results.json`` and ``out_dir/results.md``.

    python -m benchmarks.fact_tracing.run --out_dir runs/fact_tracing [--num_facts 100] [--projection_dim 32]

Gradient methods go through bergson's public API: ``bergson.build`` of the queries (loss on the
completion only) into a query store, then ``bergson.score`` of the training documents against
it (``score="individual"``: one column per query; ``unit_normalize=True`` for cosine).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import corpus as corpus_mod
from .bm25 import bm25_scores
from .metrics import evaluate
from .train import add_recipe_args, fact_recall, recipe_kwargs, train


@dataclass
class Context:
    """What a method needs: the data, the trained model and the bergson options."""

    out_dir: Path
    corpus: corpus_mod.FactCorpus
    paths: dict[str, Path]
    """``train`` and ``queries`` jsonl files (bergson datasets)."""
    model_dir: Path
    projection_dim: int = 32
    token_batch_size: int = 2048
    cache: dict[str, Any] = field(default_factory=dict)
    nested_s: float = 0.0
    """Seconds spent in :meth:`cached` steps (reported as their own steps)."""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def num_docs(self) -> int:
        return len(self.corpus.docs)

    @property
    def num_queries(self) -> int:
        return len(self.corpus.queries)

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()`` once per run (e.g. a query store shared by several methods), timed as step ``key``."""
        if key not in self.cache:
            start = time.perf_counter()
            self.cache[key] = make()
            elapsed = time.perf_counter() - start
            self.nested_s += elapsed
            self.timings[key] = round(elapsed, 2)
        return self.cache[key]

    def index_options(self, **overrides: Any) -> dict[str, Any]:
        """Common ``IndexConfig`` / ``ScoreConfig`` fields for the trained model."""
        opts: dict[str, Any] = {
            "model": str(self.model_dir),
            "precision": "fp32",
            "device": "cpu",
            "projection_dim": self.projection_dim,
            "token_batch_size": self.token_batch_size,
        }
        opts.update(overrides)
        return opts


Method = Callable[[Context], np.ndarray]
"""A method maps the context to scores [n_queries, n_docs], higher = more relevant."""


def query_store(
    ctx: Context, key: str = "plain", normalizers: Mapping[str, Any] | None = None, **overrides: Any
):
    """The queries' gradient store (one row per query, loss on the completion), built once per key.

    ``normalizers`` (e.g. optimizer second moments) are stored with it; ``bergson.score``
    then applies them to the training gradients as well.
    """
    from bergson import DataConfig, IndexConfig, build

    def make():
        path = ctx.out_dir / "stores" / f"query_{key}"
        shutil.rmtree(path, ignore_errors=True)
        cfg = IndexConfig(
            run_path=str(path),
            data=DataConfig(
                dataset=str(ctx.paths["queries"]), prompt_column="prompt", completion_column="completion"
            ),
            **ctx.index_options(**overrides),
        )
        return build(cfg, normalizers=normalizers)

    return ctx.cached(f"query_store_{key}", make)


def gradient_scores(
    ctx: Context,
    name: str,
    *,
    unit_normalize: bool,
    query_key: str = "plain",
    normalizers: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> np.ndarray:
    """``bergson.score`` of every training document against the query store ``query_key``."""
    from bergson import DataConfig, ScoreConfig, score

    query = query_store(ctx, query_key, normalizers, **overrides)
    path = ctx.out_dir / "stores" / f"scores_{name}"
    shutil.rmtree(path, ignore_errors=True)
    cfg = ScoreConfig(
        run_path=str(path),
        data=DataConfig(dataset=str(ctx.paths["train"])),
        query_path=str(query.root),
        score="individual",
        unit_normalize=unit_normalize,
        **ctx.index_options(**overrides),
    )
    return _matrix(ctx, score(cfg))


def _matrix(ctx: Context, store: Any) -> np.ndarray:
    """A scores store (rows x queries) as [n_queries, n_docs]; rows missing from the store are NaN."""
    s = np.asarray(store["scores"], dtype=np.float64)
    out = np.full((ctx.num_queries, ctx.num_docs), np.nan)
    out[:, store.rows["row_id"]] = s.T
    return out


def trackstar_scores(ctx: Context, name: str, **changes: Any) -> np.ndarray:
    """``bergson.trackstar`` on the training documents and the fact queries (resumable run dir).

    Defaults: the training run's own AdamW state as normalizer, the second moment of every
    training document, TrackStar's mixture and cosine scores; ``changes`` remove ingredients.
    """
    from bergson import DataConfig, TrackstarConfig, trackstar

    path = ctx.out_dir / "stores" / f"trackstar_{name}"
    shutil.rmtree(path, ignore_errors=True)
    opts = ctx.index_options(optimizer_state=str(ctx.model_dir / "optimizer.pt"), stats_documents=None)
    cfg = TrackstarConfig(
        run_path=str(path),
        data=DataConfig(dataset=str(ctx.paths["train"])),
        query=DataConfig(
            dataset=str(ctx.paths["queries"]), prompt_column="prompt", completion_column="completion"
        ),
        **{**opts, **changes},
    )
    store = trackstar(cfg)
    ctx.timings.update(
        {f"trackstar {name}: {k}": v for k, v in json.loads((path / "timings.json").read_text()).items()}
    )
    return _matrix(ctx, store)


def ekfac_run(ctx: Context) -> Path:
    """``bergson.ekfac`` of the fact queries against the training documents, run once: its time is
    the EK-FAC row's (fit and scores), and the rows that reuse it add nothing."""
    from bergson import DataConfig, EkfacConfig, ekfac

    if "ekfac" not in ctx.cache:
        path = ctx.out_dir / "stores" / "ekfac"
        shutil.rmtree(path, ignore_errors=True)
        opts = {k: v for k, v in ctx.index_options().items() if k != "projection_dim"}
        ekfac(
            EkfacConfig(
                run_path=str(path),
                data=DataConfig(dataset=str(ctx.paths["train"])),
                query=DataConfig(
                    dataset=str(ctx.paths["queries"]), prompt_column="prompt", completion_column="completion"
                ),
                **opts,
            )
        )
        ctx.cache["ekfac"] = path
    return ctx.cache["ekfac"]


def ekfac_scores(ctx: Context) -> np.ndarray:
    from bergson import load_gradients

    return _matrix(ctx, load_gradients(ekfac_run(ctx) / "scores"))


WHITENED_DIM = 96
"""Projection dim of the K-FAC-whitened first stage (the cascade benchmark's best: its projection
noise, not the width of the layers, sets how well it agrees with EK-FAC)."""


def whitened_scores(ctx: Context) -> np.ndarray:
    """Dot products of projected K-FAC-whitened gradients (``--whitening`` with the EK-FAC fit, p =
    :data:`WHITENED_DIM`; its time is the whitened query and training passes, the fit being EK-FAC's row)."""
    if "whitened" not in ctx.cache:
        ctx.cache["whitened"] = gradient_scores(
            ctx, "kfac_whitened", unit_normalize=False, query_key="whitened", whitening=str(ekfac_run(ctx)),
            projection_dim=WHITENED_DIM,
        )  # fmt: skip
    return ctx.cache["whitened"]


CASCADE_FRACTION = 0.05


def cascade_scores(ctx: Context) -> np.ndarray:
    """Each query's EK-FAC scores on its own top 5% of the whitened first stage (the rest ranked
    below them): a per-query cascade. Rescored rows' scores equal the full method's (the cascade's
    tests), so they are read from the full EK-FAC run rather than recomputed; its time is nil."""
    first, full = whitened_scores(ctx), ekfac_scores(ctx)
    k = max(1, round(CASCADE_FRACTION * ctx.num_docs))
    out = np.full_like(full, -np.inf)
    for q in range(ctx.num_queries):
        rows = np.argsort(-first[q], kind="stable")[:k]
        out[q, rows] = full[q, rows]
    return out


def bm25(ctx: Context) -> np.ndarray:
    return bm25_scores([d["text"] for d in ctx.corpus.docs], [q["text"] for q in ctx.corpus.queries])


def random_scores(ctx: Context) -> np.ndarray:
    return np.random.default_rng(0).random((ctx.num_queries, ctx.num_docs))


METHODS: dict[str, Method] = {
    "random": random_scores,
    "BM25": bm25,
    "gradient dot product": lambda ctx: gradient_scores(ctx, "dot", unit_normalize=False),
    "gradient cosine": lambda ctx: gradient_scores(ctx, "cosine", unit_normalize=True),
    "cosine + optimizer normalization": lambda ctx: gradient_scores(
        ctx,
        "cosine_optimizer",
        unit_normalize=True,
        query_key="optimizer",
        optimizer_state=str(ctx.model_dir / "optimizer.pt"),
    ),
    "TrackStar": lambda ctx: trackstar_scores(ctx, "full"),
    "EK-FAC": ekfac_scores,
    f"K-FAC whitened dot product (p = {WHITENED_DIM})": whitened_scores,
    "cascade per query (from the two rows above): whitened top 5%, rescored by EK-FAC": cascade_scores,
    # ablations: TrackStar with one ingredient removed ("no preconditioner" is the row above)
    "TrackStar without normalizer": lambda ctx: trackstar_scores(ctx, "no_normalizer", optimizer_state=None),
    "TrackStar without mixing": lambda ctx: trackstar_scores(ctx, "no_mixing", downweight_components=0),
    "TrackStar without unit norm": lambda ctx: trackstar_scores(ctx, "no_unit_norm", unit_normalize=False),
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _markdown(result: dict[str, Any]) -> str:
    m = result["model"]
    lines = [
        "# Fact tracing",
        "",
        f"{result['corpus']['num_facts']} facts, {result['corpus']['num_docs']} training documents "
        f"({', '.join(f'{v} {k}' for k, v in result['corpus']['docs_by_kind'].items())}); "
        f"{result['corpus']['mean_relevant_per_query']} relevant documents per query on average.",
        f"Model: {m['parameters']:,} parameters ({m['init']} init, width {m['hidden']}), "
        f"{m['epochs']:g} epochs, recall {result['recall']['recall']} "
        f"(chance {result['recall']['chance']}), exact match {result['recall']['exact_match']}.",
        f"Gradients: projection_dim {result['settings']['projection_dim']}, fp32, "
        f"{result['settings']['threads']} thread(s).",
        "",
        "| method | MRR | recall@10 | of EK-FAC's top-10 | time (s) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, r in result["methods"].items():
        ek = f"{r['ekfac_top10_recall']:.2f}" if "ekfac_top10_recall" in r else "—"
        lines.append(f"| {name} | {r['mrr']:.4f} | {r['recall@10']:.4f} | {ek} | {r['s']:.1f} |")
    lines += ["", "| step | time (s) |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.1f} |" for k, v in result["timings_s"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out_dir", default="runs/fact_tracing")
    parser.add_argument(
        "--results_dir",
        default=str(Path(__file__).resolve().parents[1] / "quality" / "results"),
        help="also write fact_tracing.{json,md,png} here ('' to skip)",
    )
    parser.add_argument("--num_facts", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_passages", type=int, default=300)
    parser.add_argument("--passage_chars", type=int, default=250)
    parser.add_argument(
        "--statements_per_fact",
        type=int,
        nargs="+",
        default=[3],
        help="documents stating each fact, drawn from these counts (2 3: recall 0.67 instead of 0.82)",
    )
    add_recipe_args(parser)
    parser.add_argument("--projection_dim", type=int, default=32)
    parser.add_argument("--token_batch_size", type=int, default=2048)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: a tiny model gains nothing from more, and loses much on a busy machine)",
    )
    parser.add_argument("--methods", nargs="*", default=None, help=f"subset of {list(METHODS)}")
    parser.add_argument("--retrain", action="store_true", help="train even if a matching checkpoint exists")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out_dir)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    corpus = corpus_mod.generate(
        args.num_facts,
        seed=args.seed,
        num_passages=args.num_passages,
        passage_chars=args.passage_chars,
        statements_per_fact=tuple(args.statements_per_fact),
    )
    paths = corpus_mod.write(corpus, out / "data")
    timings["corpus"] = round(time.perf_counter() - start, 2)

    model_dir = out / "model"
    recipe = {**recipe_kwargs(args), "data_sha256": _sha256(paths["train"])}
    info_path = model_dir / "train_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else None
    if (
        args.retrain
        or info is None
        or info.get("recipe") != recipe
        or not (model_dir / "optimizer.pt").is_file()
    ):
        start = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the JSON result
            info = train(out / "data", model_dir, threads=args.threads, **recipe_kwargs(args))
        info["recipe"] = recipe
        info_path.write_text(json.dumps(info, indent=2) + "\n")
        timings["train"] = round(time.perf_counter() - start, 2)
    else:
        timings["train (skipped: checkpoint exists)"] = 0.0

    start = time.perf_counter()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    recall = fact_recall(model, AutoTokenizer.from_pretrained(model_dir), corpus)
    del model
    timings["recall"] = round(time.perf_counter() - start, 2)

    ctx = Context(
        out,
        corpus,
        paths,
        model_dir,
        projection_dim=args.projection_dim,
        token_batch_size=args.token_batch_size,
        timings=timings,
    )
    relevant = corpus.relevant()
    results: dict[str, dict[str, float]] = {}
    every: dict[str, np.ndarray] = {}
    for name in args.methods or list(METHODS):
        before = ctx.nested_s
        start = time.perf_counter()
        scores = METHODS[name](ctx)
        elapsed = time.perf_counter() - start - (ctx.nested_s - before)
        if scores.shape != (ctx.num_queries, ctx.num_docs):
            raise ValueError(f"{name}: scores have shape {scores.shape}")
        np.save(out / f"scores_{name.replace(' ', '_')}.npy", scores.astype(np.float32))
        results[name] = {**evaluate(scores, relevant, k=10), "s": round(elapsed, 2)}
        timings[name] = round(elapsed, 2)
        every[name] = scores
    if "EK-FAC" in every:  # how much of EK-FAC's own top-10 per query each method ranks in its top-10
        ek = [set(np.argsort(-row, kind="stable")[:10].tolist()) for row in every["EK-FAC"]]
        for name, scores in every.items():
            found = [
                len(ek[q] & set(np.argsort(-scores[q], kind="stable")[:10].tolist())) for q in range(len(ek))
            ]
            results[name]["ekfac_top10_recall"] = round(float(np.mean(found)) / 10, 4)

    result = {
        "benchmark": "fact_tracing",
        "corpus": corpus.meta,
        "model": {
            k: info[k]
            for k in (
                "init",
                "hidden",
                "parameters",
                "epochs",
                "steps",
                "batch_size",
                "lr",
                "weight_decay",
                "train_s",
            )
            if k in info
        },
        "recall": recall,
        "methods": results,
        "timings_s": timings,
        "total_s": round(sum(timings.values()), 1),
        "settings": {
            "projection_dim": args.projection_dim,
            "token_batch_size": args.token_batch_size,
            "threads": args.threads,
            "metric_ties": "against the method (relevant documents ranked after tied ones)",
        },
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(_markdown(result))
    if args.results_dir:
        publish(result, Path(args.results_dir))
    print(json.dumps(result, indent=2))


def publish(result: dict[str, Any], results_dir: Path) -> None:
    """Copy the results beside the other quality benchmarks: ``fact_tracing.json``, ``.md`` (with
    the command) and ``.png`` (MRR and recall@10 per method)."""
    from ..quality.common import bar_plot, save_json

    save_json(results_dir, "fact_tracing", result)
    command = (
        "Command: `python -m benchmarks.fact_tracing.run` (defaults; `--results_dir` writes these files).\n\n"
    )
    md = _markdown(result).replace("# Fact tracing\n\n", "# Fact tracing\n\n" + command, 1)
    (results_dir / "fact_tracing.md").write_text(md + "\n![MRR and recall@10](fact_tracing.png)\n")
    methods = list(result["methods"])
    bar_plot(
        results_dir / "fact_tracing.png",
        methods,
        {
            metric: [(float(result["methods"][m][metric]), float("nan")) for m in methods]
            for metric in ("mrr", "recall@10")
        },
        "score (higher is better)",
        f"Fact tracing: {result['corpus']['num_facts']} facts, {result['corpus']['num_docs']} documents",
    )


if __name__ == "__main__":
    main()
