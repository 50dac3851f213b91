"""Attribution quality on the example causal LM: every method against real retraining.

The workload is the fine-tune of ``examples/magic/tiny.yaml`` (the shipped tiny Pythia on the
first ``--docs`` documents of the shipped corpus, AdamW, cosine schedule, input embeddings
frozen), attributed for the five shipped prompt/completion queries (loss on the completion).
The recipe is trained once; its final weights and AdamW state (written as a torch
``optimizer.pt``) are the checkpoint every gradient method scores with:

* ``dot``: ``bergson build`` (projected gradients) of the training and query sets, then
  ``bergson score --score individual`` (gradient dot products);
* ``cosine``: the same stores scored with ``--unit_normalize``;
* ``cosine_opt``: stores built with ``--optimizer_state`` (gradients divided by the square root
  of AdamW's bias-corrected second moments), scored with ``--unit_normalize``;
* ``trackstar``: ``bergson trackstar`` (optimizer normalizer, mixed preconditioner, cosine);
* ``ekfac``: ``bergson ekfac`` (EK-FAC influence, true Fisher);
* ``ekfac_k4``: the same with ``--fisher_samples 4`` (four label draws per document, averaged);
* ``astra``: ``bergson ekfac --ihvp astra --ihvp_steps 20`` (EK-FAC-preconditioned iterations
  towards the exact inverse-Fisher product);
* ``lissa`` and ``pcg``: the same with ``--ihvp lissa`` / ``--ihvp pcg`` (20 steps);
* ``trak``: ``bergson trak`` with the one trained model (projected Gauss-Newton inverse);
* ``trak4``: ``bergson trak`` over four models (the recipe with data-order seeds 0-3; the three
  extra trainings count in its cost);
* ``source`` and ``source_adam``: ``bergson source --segments`` over 3 checkpoints of the run
  (written by a second training in the Trainer's layout), with ``--step_model sgd`` / ``adam``;
  ``source_adam_discrete``: ``--step_model adam --unroll discrete``, which also models AdamW's
  first moment;
* ``magic``: ``bergson magic`` (trains the same recipe itself and differentiates through it).

Then ``bergson validate`` retrains the recipe without random subsets of documents, once per
subset for all methods together (retrains are cached under ``runs/quality_lm/retrains``): LDS
(random halves, ``--subsets`` retrains) and leave-k-out for each of ``--fractions``. For each
method and protocol the Spearman correlation over subsets between the measured change of a
query's loss and the sum of the removed documents' scores is averaged over the queries (mean ±
std over queries). Every command runs in this process, timed on its own; a rerun reuses the
finished steps (and their recorded times) under ``runs/quality_lm/`` (delete it to measure
afresh). On an idle 2-core CPU the defaults should take about 20 minutes (an estimate from the
idle timings of ``benchmarks.magic``: training 12 s, MAGIC with five query columns about 5
minutes, each of the 49 retrains about 13 s; the gradient methods a few minutes together).

    python -m benchmarks.quality.lm [--docs 240] [--subsets 16] [--fractions 0.02 0.05] [--quick]

``--held_out_queries M`` adds M queries after the shipped ones: corpus documents no run trains on
(rows from ``HELD_OUT_FIRST`` on), their first ``HELD_OUT_WORDS`` words split at the middle word
into prompt and completion. With five queries the spread over queries (a standard deviation of
0.2 to 0.3) hides differences of a few hundredths between methods; more queries narrow it, at
the cost of one more MAGIC column each.

Prints one JSON object and writes ``lm.json``, ``lm.md`` (the table and the command that
reproduces it) and ``lm.png`` to ``--out`` (``benchmarks/quality/results``).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import importlib
import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from .common import bar_plot, fmt_corr, machine, markdown_table, save_json

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "examples" / "magic" / "tiny.yaml"
ASSETS = REPO / "bergson" / "assets"
RESULTS = Path(__file__).resolve().parent / "results"
METHODS = (
    "dot",
    "cosine",
    "cosine_opt",
    "trackstar",
    "ekfac",
    "ekfac_k4",
    "astra",
    "lissa",
    "pcg",
    "trak",
    "trak4",
    "source",
    "source_adam",
    "source_adam_discrete",
    "unroll",
    "unroll_8",
    "magic",
)
FISHER_DRAWS = 4  # --fisher_samples of the ekfac_k4 row
SOURCE_CHECKPOINTS = 3  # evenly spaced checkpoints of the run that SOURCE unrolls through
ENSEMBLE_SEEDS = (1, 2, 3)  # data-order seeds of the extra models of TRAK's 4-model ensemble
UNROLL = {"unroll": (16, 16), "unroll_8": (8, 8)}  # --krylov_steps and --curvature_docs of each row
LABELS = {
    "dot": "gradient dot",
    "cosine": "cosine",
    "cosine_opt": "cosine, optimizer-normalized",
    "trackstar": "TrackStar",
    "ekfac": "EK-FAC",
    "ekfac_k4": f"EK-FAC, {FISHER_DRAWS} label draws",
    "astra": "ASTRA (20 steps)",
    "lissa": "LiSSA (20 steps)",
    "pcg": "PCG (20 steps)",
    "trak": "TRAK (one model)",
    "trak4": "TRAK (4 models)",
    "source": f"SOURCE ({SOURCE_CHECKPOINTS} checkpoints)",
    "source_adam": f"SOURCE, Adam steps ({SOURCE_CHECKPOINTS} checkpoints)",
    "source_adam_discrete": f"SOURCE, Adam steps and first moment, discrete ({SOURCE_CHECKPOINTS} checkpoints)",
    **{
        name: f"Unroll ({k} Gauss-Newton products per query, {m} documents)"
        for name, (k, m) in UNROLL.items()
    },
    "magic": "MAGIC",
}
# the bergson commands each method needs (shared stores count for every method that uses them)
PIPELINES = {
    "dot": ("build_train", "build_query", "score_dot"),
    "cosine": ("build_train", "build_query", "score_cosine"),
    "cosine_opt": ("build_train_opt", "build_query_opt", "score_cosine_opt"),
    "trackstar": ("trackstar",),
    "ekfac": ("ekfac",),
    "ekfac_k4": ("ekfac_k4",),
    "astra": ("astra",),
    "lissa": ("lissa",),
    "pcg": ("pcg",),
    "trak": ("trak",),
    "trak4": (*(f"train_seed{s}" for s in ENSEMBLE_SEEDS), "trak4"),
    "source": ("source",),  # the run's checkpoints (step "trainer") are the user's already: not counted
    "source_adam": ("source_adam",),
    "source_adam_discrete": ("source_adam_discrete",),
    **{name: (name,) for name in UNROLL},
    "magic": ("magic",),
}
STORES = {
    "dot": "scores_dot",
    "cosine": "scores_cosine",
    "cosine_opt": "scores_cosine_opt",
    "trackstar": "trackstar/scores",
    "ekfac": "ekfac/scores",
    "ekfac_k4": "ekfac_k4/scores",
    "astra": "astra/scores",
    "lissa": "lissa/scores",
    "pcg": "pcg/scores",
    "trak": "trak/scores",
    "trak4": "trak4/scores",
    "source": "source/scores",
    "source_adam": "source_adam/scores",
    "source_adam_discrete": "source_adam_discrete/scores",
    **{name: f"{name}/scores" for name in UNROLL},
    "magic": "magic/scores",
}


def log(msg: str) -> None:
    print(f"[quality.lm {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--docs", type=int, default=240, help="training documents (the first N of the corpus)")
    p.add_argument("--epochs", type=int, default=8, help="epochs of the recipe")
    p.add_argument("--max_length", type=int, default=64, help="tokens kept per document and query")
    p.add_argument("--queries", type=int, default=5, help="queries (the first N of the shipped five)")
    p.add_argument(
        "--held_out_queries",
        type=int,
        default=0,
        help="queries added after the shipped ones: held-out corpus documents split into prompt and completion",
    )
    p.add_argument("--subsets", type=int, default=16, help="retrains per protocol")
    p.add_argument("--fractions", type=float, nargs="*", default=[0.02, 0.05], help="leave-k-out fractions")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--projection_dim", type=int, default=32, help="p of the build stores (p*p per module)")
    p.add_argument(
        "--modules", nargs="+", default=["gpt_neox.layers.*"], help="tracked modules (all methods)"
    )
    p.add_argument(
        "--save_dtype",
        choices=["auto", "float16", "float32"],
        default="auto",
        help="storage dtype of the build and TrackStar stores (float32 when optimizer-normalized gradients of the "
        "output head outgrow float16)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the removed subsets")
    p.add_argument(
        "--top_k",
        type=int,
        default=12,
        help="documents removed per query in the top-k counterfactual (each query's K highest-scored, "
        "retrained once per method and query, against --top_k_random random removals of K); 0 skips it",
    )
    p.add_argument("--top_k_random", type=int, default=4, help="random removals of K to compare with")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a small slice: 16 documents, 1 epoch, 2 queries, 3 subsets, top-2 removal",
    )
    p.add_argument("--work", type=Path, default=REPO / "runs" / "quality_lm", help="cache of every step")
    p.add_argument("--out", type=Path, default=None, help=f"results directory (default {RESULTS})")
    args = p.parse_args(argv)
    args.defaults = (
        all(
            getattr(args, k) == p.get_default(k)
            for k in ("docs", "epochs", "max_length", "queries", "subsets")
        )
        and not args.quick
    )
    if args.quick:
        args.docs, args.epochs, args.max_length, args.subsets, args.queries = 16, 1, 32, 3, 2
        args.projection_dim = min(args.projection_dim, 8)
        args.top_k, args.top_k_random = min(args.top_k, 2), min(args.top_k_random, 2)
    if args.out is None:
        args.out = args.work / "quick_results" if args.quick else RESULTS
    if args.docs < 4:
        p.error(f"--docs {args.docs}: at least 4 documents are needed (LDS removes half)")
    if not 1 <= args.queries <= 5:
        p.error(f"--queries {args.queries}: the shipped query file holds 5 queries; choose 1 to 5")
    if not 0 <= args.held_out_queries <= MAX_HELD_OUT:
        p.error(f"--held_out_queries {args.held_out_queries}: choose 0 to {MAX_HELD_OUT}")
    if args.docs > HELD_OUT_FIRST and args.held_out_queries:
        p.error(f"--held_out_queries needs --docs <= {HELD_OUT_FIRST} (the held-out rows start there)")
    if args.subsets < 2:
        p.error(f"--subsets {args.subsets}: correlations need at least 2 retrains")
    return args


HELD_OUT_FIRST = 1000
"""First corpus row of the held-out queries (no run trains on rows past ``--docs``)."""

MAX_HELD_OUT = 500
"""Most held-out queries (the corpus holds 1,500 rows)."""

HELD_OUT_WORDS = 32
"""Words kept of each held-out query document (the shipped queries are 25 to 35 words)."""


def write_queries(args: argparse.Namespace, work: Path) -> tuple[str, int]:
    """The query file and how many of its rows are the queries: the shipped file's first
    ``--queries``, or, with ``--held_out_queries M``, work/queries.jsonl holding them and M
    held-out corpus documents (rows ``HELD_OUT_FIRST`` on), their first ``HELD_OUT_WORDS`` words
    split into prompt and completion at the middle word."""
    shipped = ASSETS / "queries.jsonl"
    if not args.held_out_queries:
        return str(shipped), args.queries
    rows = [json.loads(line) for line in shipped.read_text().splitlines()[: args.queries]]
    with gzip.open(ASSETS / "corpus.jsonl.gz", "rt") as f:
        corpus = [json.loads(line)["text"] for line in f]
    for i in range(HELD_OUT_FIRST, HELD_OUT_FIRST + args.held_out_queries):
        words = corpus[i].split(" ")[:HELD_OUT_WORDS]  # within --max_length tokens, as the shipped ones
        half = max(1, len(words) // 2)
        prompt, completion = " ".join(words[:half]), " " + " ".join(words[half:])
        rows.append(
            {"prompt": prompt, "completion": completion, "text": prompt + completion, "corpus_row": i}
        )
    path = work / "queries.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path), len(rows)


# ------------------------------------------------------------------------------- the workload


def make_recipe(args: argparse.Namespace, work: Path, seed: int | None = None) -> Path:
    """The example recipe on ``--docs`` documents and ``--epochs`` epochs, written to work/recipe.yaml
    (with ``seed``, the same recipe with another data-order seed, work/recipe_seed<seed>.yaml)."""
    from bergson.config import MagicConfig, load_yaml, save_yaml

    cfg = load_yaml(MagicConfig, RECIPE)
    data = replace(cfg.data, dataset=str(ASSETS / "corpus.jsonl.gz"), split=f"train[:{args.docs}]")
    cfg = replace(
        cfg,
        run_path=str(work / "magic"),
        model=str(ASSETS / "tiny-pythia"),
        device="cpu",
        data=replace(data, max_length=args.max_length),
        query=replace(
            cfg.query,
            dataset=args.query_file,
            split=f"train[:{args.num_queries}]",
            max_length=args.max_length,
        ),
        training=replace(cfg.training, epochs=args.epochs, seed=cfg.training.seed if seed is None else seed),
        query_mode="individual",
        per_token=False,
    )
    path = work / ("recipe.yaml" if seed is None else f"recipe_seed{seed}.yaml")
    save_yaml(cfg, path)
    return path


def train_checkpoint(recipe_path: Path, out: Path) -> dict[str, Any]:
    """Train the recipe once; save the final weights (a Hugging Face directory) with AdamW's state
    (``optimizer.pt``, parameters named) for the gradient methods, through the library's
    :func:`bergson.methods.magic.training_state.save_training_state`."""
    from bergson.methods.magic.command import load_recipe, prepare
    from bergson.methods.magic.replay import Replay
    from bergson.methods.magic.training_state import save_training_state

    recipe = load_recipe(str(recipe_path))
    if recipe.training.optimizer != "adamw":
        raise SystemExit("the benchmark's optimizer-normalized methods need an AdamW recipe")
    model, tokenizer, docs, _ = prepare(recipe)
    replay = Replay(model, docs, recipe.training, tokenizer.pad_token_id or 0, progress=True)
    state, losses = replay.run()
    save_training_state(model, tokenizer, state, recipe.training, replay.num_steps, out)
    return {"steps": replay.num_steps, "first_loss": losses[0], "last_loss": losses[-1]}


def train_trainer_dir(recipe_path: Path, root: Path, count: int = SOURCE_CHECKPOINTS) -> dict[str, Any]:
    """Train the recipe again, writing ``count`` evenly spaced checkpoints and the per-step learning
    rates under ``root`` in the Hugging Face Trainer's layout (what ``bergson source --segments``
    reads), as ``bergson magic --save_checkpoints`` writes them."""
    from bergson.methods.magic.command import load_recipe, prepare
    from bergson.methods.magic.replay import Replay, math_attention
    from bergson.methods.magic.training_state import (
        CheckpointWriter,
        checkpoint_steps_to_save,
        write_trainer_state,
    )

    recipe = load_recipe(str(recipe_path))
    model, tokenizer, docs, _ = prepare(recipe)
    replay = Replay(model, docs, recipe.training, tokenizer.pad_token_id or 0, progress=True)
    total = replay.num_steps
    saved = checkpoint_steps_to_save(min(count, total), total)
    writer = CheckpointWriter(root, model, tokenizer, recipe.training, saved, total)
    state, weights, losses = replay.initial_state(), replay.ones(), []
    with math_attention():
        for t in range(total):
            state, loss = replay.step(state, t, weights)
            losses.append(loss)
            writer(t + 1, state, losses)
    write_trainer_state(root, recipe.training, losses, total)
    return {"steps": total, "checkpoints": saved}


def commands(args: argparse.Namespace, work: Path, recipe: Path) -> dict[str, list[str]]:
    """``bergson`` argument lists of every step (the first item is the subcommand)."""
    ckpt = str(work / "checkpoint")
    opt = ["--optimizer_state", str(work / "checkpoint" / "optimizer.pt")]
    length = ["--truncation", "--max_length", str(args.max_length)]
    model = ["--model", ckpt, "--precision", "fp32", "--device", "cpu", "--modules", *args.modules]
    train = ["--dataset", str(ASSETS / "corpus.jsonl.gz"), "--split", f"train[:{args.docs}]", *length]
    query_file, split = args.query_file, f"train[:{args.num_queries}]"
    query = ["--dataset", query_file, "--split", split, "--prompt_column", "prompt"]
    query += ["--completion_column", "completion", *length]
    query_group = ["--query.dataset", query_file, "--query.split", split]
    query_group += ["--query.prompt_column", "prompt"]
    query_group += ["--query.completion_column", "completion", "--query.truncation"]
    query_group += ["--query.max_length", str(args.max_length)]
    proj = ["--projection_dim", str(args.projection_dim)]
    if args.save_dtype != "auto":
        proj += ["--save_dtype", args.save_dtype]

    def score(name: str, index: str, queries: str, *extra: str) -> list[str]:
        return ["score", str(work / name), "--index", str(work / index), "--query_path", str(work / queries),
                "--score", "individual", "--device", "cpu", *extra]  # fmt: skip

    return {
        "build_train": ["build", str(work / "train"), *model, *train, *proj],
        "build_query": ["build", str(work / "query"), *model, *query, *proj],
        "score_dot": score("scores_dot", "train", "query"),
        "score_cosine": score("scores_cosine", "train", "query", "--unit_normalize"),
        "build_train_opt": ["build", str(work / "train_opt"), *model, *train, *proj, *opt],
        "build_query_opt": ["build", str(work / "query_opt"), *model, *query, *proj, *opt],
        "score_cosine_opt": score("scores_cosine_opt", "train_opt", "query_opt", "--unit_normalize"),
        "trackstar": [
            "trackstar",
            str(work / "trackstar"),
            *model,
            *train,
            *query_group,
            *proj,
            *opt,
            "--stats_documents",
            str(args.docs),
        ],
        "ekfac": ["ekfac", str(work / "ekfac"), *model, *train, *query_group],
        "ekfac_k4": [
            "ekfac",
            str(work / "ekfac_k4"),
            *model,
            *train,
            *query_group,
            "--fisher_samples",
            str(FISHER_DRAWS),
        ],
        **{
            solver: [
                "ekfac",
                str(work / solver),
                *model,
                *train,
                *query_group,
                "--ihvp",
                solver,
                "--ihvp_steps",
                "20",
            ]
            for solver in ("astra", "lissa", "pcg")
        },
        "trak": ["trak", str(work / "trak"), *model, *train, *query_group, *proj],
        "trak4": [
            "trak",
            str(work / "trak4"),
            "--models",
            ckpt,
            *(str(work / f"checkpoint_seed{s}") for s in ENSEMBLE_SEEDS),
            *model[2:],
            *train,
            *query_group,
            *proj,
        ],
        **{
            name: [
                "source",
                str(work / name),
                "--segments",
                str(work / "trainer"),
                "--step_model",
                step,
                "--unroll",
                unroll,
                *model[2:],
                *train,
                *query_group,
            ]
            for name, step, unroll in (
                ("source", "sgd", "exp"),
                ("source_adam", "adam", "exp"),
                ("source_adam_discrete", "adam", "discrete"),
            )
        },
        **{
            name: [
                "unroll",
                str(work / name),
                "--config",
                str(unroll_config(recipe, work)),
                "--model",
                ckpt,
                "--krylov_steps",
                str(k),
                "--curvature_docs",
                str(m),
            ]
            for name, (k, m) in UNROLL.items()
        },
        "magic": ["magic", str(recipe), "--checkpoints", "sqrt"],
    }


def unroll_config(recipe: Path, work: Path) -> Path:
    """work/unroll.yaml: the recipe's documents, queries and training (what ``bergson unroll`` follows),
    with one score column per query, on the CPU in float32."""
    from bergson.config import MagicConfig, UnrollConfig, load_yaml, save_yaml

    cfg = load_yaml(MagicConfig, recipe)
    out = UnrollConfig(data=cfg.data, query=cfg.query, training=cfg.training, query_mode="individual",
                       precision="fp32", device="cpu")  # fmt: skip
    path = work / "unroll.yaml"
    save_yaml(out, path)
    return path


# ------------------------------------------------------------------------------- running steps


class Steps:
    """Runs each step once and records its wall time in work/steps.json (a rerun reuses both)."""

    def __init__(self, work: Path):
        self.path = work / "steps.json"
        self.done: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def run(self, name: str, key: list[str], fn: Any) -> dict[str, Any]:
        if self.done.get(name, {}).get("key") == key:
            return self.done[name]
        log(f"{name}: {' '.join(key)[:160]}")
        start = time.perf_counter()
        info = fn() or {}
        seconds = round(time.perf_counter() - start, 2)
        self.done[name] = {"key": key, "seconds": seconds, **machine(), **info}
        self.path.write_text(json.dumps(self.done, indent=1))
        return self.done[name]


def warm_imports(checkpoint: Path) -> None:
    """Import every command's module and the checkpoint's model class before the first timed step, so
    that no method's time carries the interpreter's one-off import cost (whichever step runs first)."""
    from transformers import AutoModelForCausalLM

    from bergson.cli import COMMANDS

    for module, *_ in COMMANDS.values():
        importlib.import_module(module)
    AutoModelForCausalLM.from_pretrained(checkpoint)


def bergson(argv: list[str]) -> None:
    """One ``bergson`` command in this process (parsed exactly as the CLI parses it)."""
    from bergson.cli import COMMANDS, parse

    cfg = parse(argv[0], argv[1:])
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON result alone
        importlib.import_module(COMMANDS[argv[0]][0]).run(cfg)


def retrain_seconds(report: dict[str, Any], protocol: str, fraction: float, seed: int) -> dict[str, float]:
    """Recorded seconds of each retrain a report used (by cache file name), however long ago it ran."""
    import numpy as np

    from bergson.validation import draw_subsets

    drawn = draw_subsets(report["documents"], protocol, fraction, report["subsets"], seed)
    out = {}
    for ids in [np.array([], np.int64), *drawn]:
        name = hashlib.sha256(np.sort(np.asarray(ids, np.int64)).tobytes()).hexdigest()[:16]
        out[name] = json.loads((Path(report["retrain_cache"]) / f"{name}.json").read_text())["seconds"]
    return out


def validate(work: Path, recipe: Path, stores: list[str], protocol: str, fraction: float, args: Any) -> Any:
    from bergson.config import ValidateConfig
    from bergson.validation import validate as run_validation

    tag = "lds" if protocol == "lds" else f"lko_{fraction:g}"
    cfg = ValidateConfig(
        run_path=str(work / f"validate_{tag}"),
        recipe=str(recipe),
        scores=stores,
        protocol=protocol,  # type: ignore[arg-type]
        num_subsets=args.subsets,
        seed=args.seed,
        cache_dir=str(args.work / "retrains"),
        device="cpu",
    )
    if protocol == "leave_k_out":  # lds removes half and refuses a --fraction
        cfg = replace(cfg, fraction=fraction)
    log(f"validate {tag}: {args.subsets} retrains shared by {len(stores)} stores")
    return run_validation(cfg)


def validate_top_k(work: Path, recipe: Path, stores: list[str], args: Any) -> Any:
    """``bergson validate --protocol top_k``: each query's top ``--top_k`` documents removed."""
    from bergson.config import ValidateConfig
    from bergson.validation import validate as run_validation

    cfg = ValidateConfig(
        run_path=str(work / "validate_top_k"),
        recipe=str(recipe),
        scores=stores,
        protocol="top_k",
        top_k=[args.top_k],
        num_subsets=args.top_k_random,
        seed=args.seed,
        cache_dir=str(args.work / "retrains"),
        device="cpu",
    )
    log(
        f"validate top_k: {len(stores)} stores x queries removals of {args.top_k}, {args.top_k_random} random"
    )
    return run_validation(cfg)


# ------------------------------------------------------------------------------- report


def shown_path(path: str | Path) -> str:
    """A path relative to the repository when it lies inside it (results name no one's checkout)."""
    p = Path(path)
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def protocol_name(protocol: str, fraction: float) -> str:
    return "LDS" if protocol == "lds" else f"leave-{fraction * 100:g}%-out"


def held_out_text(w: dict[str, Any]) -> str:
    """What the held-out queries of a run are, for the table's caption ('' when there are none)."""
    m = w.get("held_out_queries", 0)
    if not m:
        return ""
    return (
        f" (the shipped {w['queries'] - m}, then {m} held-out corpus documents, rows {HELD_OUT_FIRST} to "
        f"{HELD_OUT_FIRST + m - 1}, their first {HELD_OUT_WORDS} words split at the middle one)"
    )


def write_outputs(result: dict[str, Any], out: Path) -> None:
    save_json(out, "lm", result)
    protocols = [p["name"] for p in result["protocols"]]
    methods = result["methods"]
    k = (result.get("top_k") or {}).get("k")
    topk = [f"top-{k} removal: Δloss (random)"] if k else []
    header = [
        "method",
        *(f"{p} Spearman" for p in protocols),
        *topk,
        "scoring wall s",
        "cost (training runs)",
    ]
    rows = [
        [
            LABELS[m],
            *(fmt_corr(e["quality"][p]["mean_spearman"], e["quality"][p]["std_spearman"]) for p in protocols),
            *(
                [
                    f"{e['quality']['top_k']['mean_loss_change']:+.3f} ({e['quality']['top_k']['mean_random']:+.3f})"
                ]
                if k
                else []
            ),
            f"{e['scoring_wall_s']:.1f}",
            f"{e['training_runs']:.2f}",
        ]
        for m, e in methods.items()
    ]
    w, mach = result["workload"], result["machine"]
    low, high = result["load_avg_1m_range"]
    retrains = "; ".join(
        f"{p['name']}: {p['subsets']} retrains without {p['removed_per_subset']} of {w['documents']} documents"
        for p in result["protocols"]
    )
    text = [
        "# Attribution quality on the example causal LM\n",
        f"Fine-tune of `examples/magic/tiny.yaml`: {w['documents']} documents of the shipped corpus "
        f"(≤ {w['max_length']} tokens), {w['epochs']} epochs ({w['steps']} AdamW steps), {w['queries']} "
        f"prompt/completion queries{held_out_text(w)}. {retrains}. Each cell is the Spearman correlation over retrains "
        "between the measured change of a query's loss and the sum of the removed documents' scores, "
        "mean ± std over the queries. Scoring wall time is each method's own bergson commands "
        f"(training the shared checkpoint took {result['train_s']:.1f} s; MAGIC trains by itself; the "
        "4-model TRAK ensemble includes training its 3 extra models). Cost divides it by one training "
        f"run of the recipe, the median retrain ({result['training_run_s']:.1f} s)."
        + (
            f" Top-{k} removal (`bergson validate --protocol top_k`): each query's loss change after retraining "
            f"without its {k} highest-scored documents, mean over the queries; in parentheses the same for {k} "
            f"random documents (mean of {result['top_k']['random_removals']} draws). A method that finds the "
            "documents a query depends on raises the loss well above random."
            if k
            else ""
        )
        + "\n",
        markdown_table(header, rows),
        f"\nTracked modules `{' '.join(w['modules'])}`, projection p = {w['projection_dim']} for the "
        f"build stores. Measured from {mach['date_utc']} UTC on {mach['cpus']} CPU cores, 1-minute load "
        f"average {low:g}{'' if low == high else f' to {high:g}'} when the steps ended (above the core count, other work shared the machine and slowed "
        f"every timing); {result['retrains']} retrains took {result['retrain_s']:.0f} s in all.\n",
        ""
        if result["defaults"]
        else "\nA reduced slice: the default command (`python -m benchmarks.quality.lm`) runs 240 documents, "
        "8 epochs (240 steps) and 16 retrains per protocol.\n",
        f"\nReproduce:\n\n```bash\n{result['command']}\n```\n",
    ]
    (out / "lm.md").write_text("\n".join(text))
    series = {
        p: [
            (methods[m]["quality"][p]["mean_spearman"], methods[m]["quality"][p]["std_spearman"])
            for m in methods
        ]
        for p in protocols
    }
    bar_plot(
        out / "lm.png",
        [LABELS[m] for m in methods],
        series,
        "Spearman (mean ± std over queries)",
        f"Example causal LM, {w['documents']} documents: scores vs retraining",
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    settings = [args.docs, args.epochs, args.max_length, args.queries, args.projection_dim, args.modules]
    if args.held_out_queries:  # (the default runs keep their cache directory)
        settings.append(args.held_out_queries)
    tag = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:10]
    work = (args.work / f"run_{tag}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    args.query_file, args.num_queries = write_queries(args, work)
    recipe = make_recipe(args, work)
    steps = Steps(work)
    cmds = commands(args, work, recipe)
    trained = steps.run(
        "train", ["train", str(recipe)], lambda: train_checkpoint(recipe, work / "checkpoint")
    )
    needed = list(dict.fromkeys(s for m in args.methods for s in PIPELINES[m]))
    warm_imports(work / "checkpoint")
    if {"source", "source_adam", "source_adam_discrete"} & set(args.methods):
        steps.run("trainer", ["trainer", str(recipe)], lambda: train_trainer_dir(recipe, work / "trainer"))
    for name in needed:
        if name.startswith("train_seed"):  # another model of an ensemble: the recipe with another seed
            seed = int(name.removeprefix("train_seed"))
            path = make_recipe(args, work, seed)
            out = work / f"checkpoint_seed{seed}"
            steps.run(name, ["train", str(path)], lambda path=path, out=out: train_checkpoint(path, out))
            continue
        steps.run(name, cmds[name], lambda name=name: bergson(cmds[name]))
    stores = {m: str(work / STORES[m]) for m in args.methods}
    protocols = [("lds", 0.5)] + [("leave_k_out", f) for f in args.fractions]
    quality: dict[str, dict[str, Any]] = {m: {} for m in args.methods}
    plist, retrains = [], {}
    for protocol, fraction in protocols:
        report = validate(work, recipe, list(stores.values()), protocol, fraction, args)
        name = protocol_name(protocol, fraction)
        used = retrain_seconds(report, protocol, fraction, args.seed)
        retrains.update(used)
        plist.append(
            {
                "name": name,
                "protocol": protocol,
                "fraction": fraction if protocol != "lds" else 0.5,
                "removed_per_subset": report["removed_per_subset"],
                "subsets": report["subsets"],
                "retrain_s": round(sum(used.values()), 2),
                "report": shown_path(
                    work / f"validate_{'lds' if protocol == 'lds' else f'lko_{fraction:g}'}"
                ),
            }
        )
        for m, path in stores.items():
            e = report["stores"][path]
            quality[m][name] = {
                "mean_spearman": e["mean_spearman"],
                "std_spearman": e["std_spearman"],
                "mean_pearson": e["mean_pearson"],
                "per_query_spearman": [q["spearman"] for q in e["per_query"]],
            }
    top_k = None
    if args.top_k:
        top_k = validate_top_k(work, recipe, list(stores.values()), args)
        for m, path in stores.items():
            entry = top_k["stores"][path]["top_k"][str(args.top_k)]
            quality[m]["top_k"] = {k: v for k, v in entry.items() if k != "queries"}
            quality[m]["top_k"]["per_query_loss_change"] = [q["loss_change"] for q in entry["queries"]]
    now = machine()
    loads = [v["load_avg_1m"] for v in steps.done.values() if "load_avg_1m" in v] or [now["load_avg_1m"]]
    mach = {"cpus": os.cpu_count(), "date_utc": steps.done["train"].get("date_utc", now["date_utc"])}
    # one training run: every retrain runs the recipe's steps (removed documents only weigh 0), so the
    # median retrain is the cost of one plain training run of the recipe in this process
    run_s = float(statistics.median(retrains.values()))
    methods = {
        m: {
            "label": LABELS[m],
            "scoring_wall_s": round(sum(steps.done[s]["seconds"] for s in PIPELINES[m]), 2),
            "training_runs": round(sum(steps.done[s]["seconds"] for s in PIPELINES[m]) / run_s, 2),
            "steps": {s: steps.done[s]["seconds"] for s in PIPELINES[m]},
            "scores": shown_path(stores[m]),
            "quality": quality[m],
        }
        for m in args.methods
    }
    shown = [a for a in (argv if argv is not None else sys.argv[1:]) if a]
    result = {
        "benchmark": "quality.lm",
        "command": "python -m benchmarks.quality.lm" + "".join(f" {shlex.quote(a)}" for a in shown),
        "machine": mach,
        "workload": {
            "recipe": str(RECIPE.relative_to(REPO)),
            "documents": args.docs,
            "epochs": args.epochs,
            "steps": trained["steps"],
            "max_length": args.max_length,
            "queries": args.num_queries,
            "held_out_queries": args.held_out_queries,
            "modules": args.modules,
            "projection_dim": args.projection_dim,
            "work": shown_path(work),
        },
        "train_s": trained["seconds"],
        "retrain_s": round(sum(retrains.values()), 2),
        "retrains": len(retrains),
        "training_run_s": round(run_s, 2),
        "compute_s": round(sum(v["seconds"] for v in steps.done.values()) + sum(retrains.values()), 2),
        "load_avg_1m_range": [min(loads), max(loads)],
        "defaults": args.defaults,
        "protocols": plist,
        "top_k": None
        if top_k is None
        else {
            "k": args.top_k,
            "random_removals": args.top_k_random,
            "report": shown_path(work / "validate_top_k"),
        },
        "methods": methods,
    }
    write_outputs(result, args.out)
    from .choose import refresh

    refresh(args.out)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
