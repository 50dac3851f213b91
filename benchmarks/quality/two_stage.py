"""Attribution quality when the attributed documents were trained on before another stage.

Stage 1 fine-tunes the shipped tiny Pythia on the first ``--docs`` documents of the shipped corpus
(the recipe of ``examples/magic/tiny.yaml``); stage 2 continues from it on the next
``--finetune_docs`` documents with the same recipe (a fresh AdamW state). The documents to
attribute are stage 1's; the queries are evaluated after stage 2. Methods that look at one
checkpoint see the final model, whose gradients and curvature stage 2 has moved: the setting
where unrolling through the training (SOURCE, MAGIC) is expected to matter.

Ground truth: for each of ``--subsets`` random halves of the stage-1 documents, both stages are
retrained without it (stage 1 without the half, then stage 2 unchanged from that result) and the
change of each query's loss is measured; each method's LDS is the Spearman correlation over the
halves between that change and the sum of the removed documents' scores (mean ± std over
queries). Every gradient method runs through the ``bergson`` CLI on the final model (rows
``... at the end of stage 1`` run on the stage-1 checkpoint instead, for contrast). MAGIC and
Unroll differentiate through one recipe only, so they have no row here.

    python -m benchmarks.quality.two_stage [--docs 120] [--finetune_docs 120] [--epochs 4] [--subsets 8]

Prints one JSON object and writes ``two_stage.json`` and ``two_stage.md`` to ``--out``
(``benchmarks/quality/results``). Steps and retrains are cached under ``--work``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from .common import fmt_corr, machine, markdown_table, save_json
from .lm import (
    ASSETS,
    LABELS,
    REPO,
    RESULTS,
    SOURCE_CHECKPOINTS,
    STORES,
    Steps,
    bergson,
    commands,
    log,
    make_recipe,
    shown_path,
    train_checkpoint,
    train_trainer_dir,
)
from .lm import METHODS as LM_METHODS
from .lm import PIPELINES as LM_PIPELINES

# every method of the LM benchmark but the 4-model ensemble (its extra models would need two stages
# each) and MAGIC and Unroll (one recipe only); the stages' checkpoints that SOURCE reads are not counted
METHODS = tuple(m for m in LM_METHODS if m not in ("trak4", "magic", "unroll", "unroll_8"))
PIPELINES = {m: LM_PIPELINES[m] for m in METHODS}
STAGE1 = ("ekfac", "trak")  # also run on the stage-1 checkpoint, for contrast


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--docs", type=int, default=120, help="stage-1 documents (attributed)")
    p.add_argument("--finetune_docs", type=int, default=120, help="stage-2 documents (the next ones)")
    p.add_argument("--epochs", type=int, default=4, help="epochs of each stage")
    p.add_argument("--max_length", type=int, default=64)
    p.add_argument("--queries", type=int, default=5)
    p.add_argument("--subsets", type=int, default=8, help="retrains (random halves of stage 1)")
    p.add_argument("--projection_dim", type=int, default=32)
    p.add_argument("--modules", nargs="+", default=["gpt_neox.layers.*"])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--save_dtype", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=REPO / "runs" / "quality_two_stage")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.docs < 4 or args.finetune_docs < 1:
        p.error("--docs must be >= 4 and --finetune_docs >= 1")
    if args.subsets < 2:
        p.error(f"--subsets {args.subsets}: correlations need at least 2 retrains")
    return args


def stage_two_recipe(args: argparse.Namespace, work: Path, stage_one: Path) -> Path:
    """Stage 2: the stage-1 recipe on the next --finetune_docs documents, from stage 1's weights."""
    from bergson.config import MagicConfig, load_yaml, save_yaml

    cfg = load_yaml(MagicConfig, work / "stage1" / "recipe.yaml")
    split = f"train[{args.docs}:{args.docs + args.finetune_docs}]"
    cfg = replace(
        cfg, model=str(stage_one), run_path=str(work / "stage2"), data=replace(cfg.data, split=split)
    )
    path = work / "stage2" / "recipe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, path)
    return path


class TwoStageRetrainer:
    """Both stages retrained with stage-1 documents removed; each query's final loss (cached)."""

    def __init__(self, recipe1: Path, recipe2: Path, cache: Path):
        from bergson.methods.magic.command import load_recipe, prepare
        from bergson.methods.magic.replay import Replay

        self.r1, self.r2 = load_recipe(str(recipe1)), load_recipe(str(recipe2))
        self.model1, tok, self.docs1, self.queries = prepare(self.r1)
        self.model2, _, self.docs2, _ = prepare(self.r2)
        self.pad = tok.pad_token_id or 0
        self.replay1 = Replay(self.model1, self.docs1, self.r1.training, self.pad, progress=False)
        key = json.dumps([recipe1.read_text(), recipe2.read_text()])
        self.dir = cache / hashlib.sha256(key.encode()).hexdigest()[:16]
        self.dir.mkdir(parents=True, exist_ok=True)

    def query_losses(self, removed: Any) -> tuple[Any, float]:
        import numpy as np
        import torch

        from bergson.methods.magic.replay import Replay, query_losses

        ids = np.sort(np.asarray(removed, np.int64))
        path = self.dir / f"{hashlib.sha256(ids.tobytes()).hexdigest()[:16]}.json"
        if path.is_file():
            rec = json.loads(path.read_text())
            return np.asarray(rec["query_losses"]), rec["seconds"]
        start = time.perf_counter()
        w = torch.as_tensor(self.replay1.layout.ones_except(ids), dtype=self.replay1.ones().dtype)
        state1, _ = self.replay1.run(w)
        named = dict(self.model2.named_parameters())
        with torch.no_grad():
            for k, v in state1.params.items():
                named[k].copy_(v)
        state2, _ = Replay(self.model2, self.docs2, self.r2.training, self.pad, progress=False).run()
        with torch.no_grad():
            losses = query_losses(self.model2, state2.params, self.queries, self.pad).double().numpy()
        seconds = time.perf_counter() - start
        path.write_text(
            json.dumps({"removed": ids.tolist(), "query_losses": losses.tolist(), "seconds": seconds})
        )
        return losses, seconds


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import numpy as np

    from bergson.store import load_gradients
    from bergson.validation import check_store, draw_subsets, score_correlations

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    settings = [
        args.docs,
        args.finetune_docs,
        args.epochs,
        args.max_length,
        args.queries,
        args.projection_dim,
    ]
    tag = hashlib.sha256(json.dumps([*settings, args.modules]).encode()).hexdigest()[:10]
    work = (args.work / f"run_{tag}").resolve()
    (work / "stage1").mkdir(parents=True, exist_ok=True)
    recipe1 = make_recipe(args, work / "stage1")
    steps = Steps(work)
    t1 = steps.run(
        "train_stage1",
        ["train", str(recipe1)],
        lambda: train_checkpoint(recipe1, work / "stage1" / "checkpoint"),
    )
    recipe2 = stage_two_recipe(args, work, work / "stage1" / "checkpoint")
    t2 = steps.run(
        "train_stage2", ["train", str(recipe2)], lambda: train_checkpoint(recipe2, work / "checkpoint")
    )
    final = commands(args, work, recipe1)  # the model is work/checkpoint: the end of stage 2
    first = commands(args, work / "stage1", recipe1)
    if {"source", "source_adam", "source_adam_discrete"} & set(args.methods):
        # SOURCE unrolls through both stages' checkpoints, on both stages' documents (rows of one dataset)
        for stage, recipe in (("stage1", recipe1), ("stage2", recipe2)):
            steps.run(f"trainer_{stage}", ["trainer", str(recipe)],
                      lambda recipe=recipe, stage=stage: train_trainer_dir(recipe, work / stage / "trainer"))  # fmt: skip
        rest = final["ekfac"][2:]
        i = rest.index("--model")
        del rest[i : i + 2]
        rest[rest.index("--split") + 1] = f"train[:{args.docs + args.finetune_docs}]"
        for name, step, unroll in (
            ("source", "sgd", "exp"),
            ("source_adam", "adam", "exp"),
            ("source_adam_discrete", "adam", "discrete"),
        ):
            final[name] = ["source", str(work / name), "--segments", str(work / "stage1" / "trainer"),
                           str(work / "stage2" / "trainer"), "--stage_rows", f":{args.docs}", f"{args.docs}:",
                           "--step_model", step, "--unroll", unroll, *rest]  # fmt: skip
    rows: dict[str, dict[str, Any]] = {}
    for m in args.methods:
        for name in PIPELINES[m]:
            steps.run(name, final[name], lambda name=name: bergson(final[name]))
        rows[m] = {"label": LABELS[m], "steps": PIPELINES[m], "store": work / STORES[m]}
    for name, what in (
        ("source", "SOURCE"),
        ("source_adam", "SOURCE, Adam steps"),
        ("source_adam_discrete", "SOURCE, Adam steps and first moment, discrete"),
    ):
        if name in rows:
            rows[name]["label"] = f"{what} ({SOURCE_CHECKPOINTS} + {SOURCE_CHECKPOINTS} checkpoints)"
            rows[name]["rows"] = args.docs + args.finetune_docs  # both stages' documents; stage 1's first
    for m in STAGE1:
        if m in args.methods:
            for name in PIPELINES[m]:
                steps.run(f"stage1_{name}", first[name], lambda name=name: bergson(first[name]))
            rows[f"{m}_stage1"] = {
                "label": f"{LABELS[m]} at the end of stage 1",
                "steps": tuple(f"stage1_{s}" for s in PIPELINES[m]),
                "store": work / "stage1" / STORES[m],
            }
    retrainer = TwoStageRetrainer(recipe1, recipe2, args.work / "retrains")
    subsets = draw_subsets(args.docs, "lds", 0.5, args.subsets, args.seed)
    log(f"{len(subsets) + 1} two-stage retrains")
    base, base_s = retrainer.query_losses(np.array([], np.int64))
    results = [retrainer.query_losses(s) for s in subsets]
    measured = np.stack([losses - base for losses, _ in results])
    run_s = float(statistics.median([base_s, *(s for _, s in results)]))
    methods = {}
    for key, row in rows.items():
        num = row.get("rows", args.docs)
        scores = check_store(load_gradients(row["store"]), str(row["store"]), num, args.queries)[: args.docs]
        corr = score_correlations(scores, subsets, measured)
        wall = sum(steps.done[s]["seconds"] for s in row["steps"])
        methods[key] = {
            "label": row["label"],
            "scoring_wall_s": round(wall, 2),
            "training_runs": round(wall / run_s, 2),
            "mean_spearman": corr["mean_spearman"],
            "std_spearman": corr["std_spearman"],
            "per_query_spearman": [q["spearman"] for q in corr["per_query"]],
            "scores": shown_path(row["store"]),
        }
    shown = [a for a in (argv if argv is not None else sys.argv[1:]) if a]
    result = {
        "benchmark": "quality.two_stage",
        "command": "python -m benchmarks.quality.two_stage" + "".join(f" {shlex.quote(a)}" for a in shown),
        "machine": {**machine(), "first_step_utc": steps.done["train_stage1"].get("date_utc")},
        "workload": {
            "stage1_documents": args.docs,
            "stage2_documents": args.finetune_docs,
            "epochs_per_stage": args.epochs,
            "steps": [t1["steps"], t2["steps"]],
            "max_length": args.max_length,
            "queries": args.queries,
            "subsets": args.subsets,
            "modules": args.modules,
            "projection_dim": args.projection_dim,
            "corpus": shown_path(ASSETS / "corpus.jsonl.gz"),
        },
        "training_run_s": round(run_s, 2),
        "methods": methods,
    }
    save_json(args.out, "two_stage", result)
    header = ["method", "LDS Spearman", "scoring wall s", "cost (training runs)"]
    table = [
        [e["label"], fmt_corr(e["mean_spearman"], e["std_spearman"]), f"{e['scoring_wall_s']:.1f}",
         f"{e['training_runs']:.2f}"]
        for e in methods.values()
    ]  # fmt: skip
    w = result["workload"]
    text = [
        "# Attribution quality after a second training stage\n",
        f"Stage 1 fine-tunes the shipped tiny Pythia on {w['stage1_documents']} documents, stage 2 continues on "
        f"the next {w['stage2_documents']} ({w['epochs_per_stage']} epochs each, {w['steps'][0]} + {w['steps'][1]} "
        f"AdamW steps). The stage-1 documents are attributed for {w['queries']} queries evaluated after stage 2. "
        f"LDS over {w['subsets']} random halves of stage 1, each retrained through both stages; Spearman mean ± "
        f"std over queries. Cost is the method's wall time over one two-stage training run "
        f"({result['training_run_s']:.1f} s, the median retrain).\n",
        markdown_table(header, table),
        f"\nMeasured {result['machine']['date_utc']} UTC on {result['machine']['cpus']} CPU cores "
        f"(1-minute load {result['machine']['load_avg_1m']} at the end).\n",
        f"\nReproduce:\n\n```bash\n{result['command']}\n```\n",
    ]
    (args.out / "two_stage.md").write_text("\n".join(text))
    from .choose import refresh

    refresh(args.out)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
