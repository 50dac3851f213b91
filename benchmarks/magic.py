"""MAGIC's cost and quality on the shipped example fine-tune.

Every run is a separate process measured from outside (wall time, peak RSS of its process
tree), in one invocation:

* ``train``: the same recipe trained once without attribution (bergson's replayable training
  loop, no checkpoints), the baseline of every ratio;
* ``plain``: the recipe's batches through a plain Hugging Face forward/backward with
  ``torch.optim.AdamW`` (how far the functional training loop is from an ordinary one);
* ``magic:<schedule>`` for every, sqrt and log checkpoints: ``bergson magic`` with one
  aggregated query column (train + reverse pass);
* quality: ``bergson magic`` with one column per query and ``bergson validate`` (leave-k-out,
  each of ``--fractions`` of the documents removed, ``--num_subsets`` retrains each), Spearman
  and Pearson per query and averaged.

    python -m benchmarks.magic [--epochs 8] [--num_subsets 20] [--fractions 0.02 0.05] [--skip_quality]

Prints one JSON object. The recipe is ``examples/magic/tiny.yaml`` (240 documents, 8 epochs of
30 steps: 240 optimizer steps) with ``--epochs`` epochs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .peers.published_bergson import clean_env, log, run_measured

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "magic" / "tiny.yaml"
WORK = REPO / "runs" / "bench_magic"


def measured(tool: str, cmd: list[str], log_name: str) -> dict[str, Any]:
    WORK.mkdir(parents=True, exist_ok=True)
    env = clean_env()
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    m = run_measured(tool, cmd, env, REPO, WORK / log_name, 3600)
    if m.rc != 0:
        raise SystemExit(f"{tool} failed (rc={m.rc}); see {WORK / log_name}")
    return {
        "wall_s": round(m.wall_s, 2),
        "peak_rss_mb": round(m.peak_rss_mb, 1),
        "load_avg": [m.load_before, m.load_after],
    }


def overrides(epochs: int) -> list[str]:
    return ["--training.epochs", str(epochs), "--device", "cpu"]


def train_only(plain: bool, epochs: int) -> None:
    """Child process: train the recipe without attribution and print its step count and time."""
    import torch

    from bergson.cli import parse
    from bergson.methods.magic.command import prepare
    from bergson.methods.magic.replay import Replay

    cfg = parse("magic", [str(CONFIG), *overrides(epochs)])
    model, tokenizer, docs, _ = prepare(cfg)
    replay = Replay(model, docs, cfg.training, tokenizer.pad_token_id or 0, progress=False)
    start = time.perf_counter()
    if plain:
        from bergson.data.batching import pad_batch

        model.requires_grad_(True)
        r = cfg.training
        opt = torch.optim.AdamW(
            model.parameters(), lr=r.lr, betas=(r.beta1, r.beta2), eps=r.eps, weight_decay=r.weight_decay
        )
        for t in range(replay.num_steps):
            for idx in replay.plan[t]:
                ids, labels = pad_batch(docs, idx, tokenizer.pad_token_id or 0)
                model(input_ids=ids, labels=labels).loss.backward()
            if r.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), r.max_grad_norm)
            opt.step()
            opt.zero_grad()
    else:
        replay.run()
    print(json.dumps({"steps": replay.num_steps, "seconds": time.perf_counter() - start}))


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--num_subsets", type=int, default=20)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.02, 0.05])
    p.add_argument("--skip_quality", action="store_true")
    p.add_argument("--child", choices=["train", "plain"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        train_only(args.child == "plain", args.epochs)
        return
    py = [sys.executable, "-m"]
    result: dict[str, Any] = {
        "recipe": f"{CONFIG.relative_to(REPO)} with {' '.join(overrides(args.epochs))}",
        "machine": {"cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M")},
    }
    for child in ("train", "plain"):
        log(child)
        result[child] = measured(
            child, [*py, "benchmarks.magic", "--child", child, "--epochs", str(args.epochs)], f"{child}.log"
        )
    base = result["train"]
    for schedule in ("every", "sqrt", "log"):
        log(f"magic --checkpoints {schedule}")
        run = WORK / f"agg_{schedule}"
        cmd = [*py, "bergson", "magic", str(CONFIG), "--run_path", str(run), "--checkpoints", schedule,
               "--query_mode", "aggregate", "--no-per_token", "--overwrite", *overrides(args.epochs)]  # fmt: skip
        m = measured(f"magic-{schedule}", cmd, f"magic_{schedule}.log")
        timings = json.loads((run / "timings.json").read_text())
        m.update(
            time_ratio=round(m["wall_s"] / base["wall_s"], 2),
            memory_ratio=round(m["peak_rss_mb"] / base["peak_rss_mb"], 2),
            timings=timings,
        )
        result[f"magic:{schedule}"] = m
    if not args.skip_quality:
        run = WORK / "individual"
        log("magic, one column per query")
        cmd = [*py, "bergson", "magic", str(CONFIG), "--run_path", str(run), "--checkpoints", "sqrt",
               "--query_mode", "individual", "--overwrite", *overrides(args.epochs)]  # fmt: skip
        result["magic:individual"] = measured("magic-individual", cmd, "magic_individual.log")
        result["quality"] = []
        for fraction in args.fractions:
            log(f"validate, fraction {fraction}")
            val = WORK / f"validate_{fraction}"
            cmd = [*py, "bergson", "validate", str(val), "--recipe", str(run), "--scores", str(run / "scores"),
                   "--fraction", str(fraction), "--num_subsets", str(args.num_subsets)]  # fmt: skip
            timing = measured("validate", cmd, f"validate_{fraction}.log")
            report = json.loads((val / "validation.json").read_text())
            entry = next(iter(report["stores"].values()))
            result["quality"].append(
                {
                    "protocol": report["protocol"],
                    "fraction": fraction,
                    "removed_per_subset": report["removed_per_subset"],
                    "documents": report["documents"],
                    "subsets": report["subsets"],
                    "mean_spearman": round(entry["mean_spearman"], 4),
                    "std_spearman": round(entry["std_spearman"], 4),
                    "mean_pearson": round(entry["mean_pearson"], 4),
                    "per_query_spearman": [round(q["spearman"], 4) for q in entry["per_query"]],
                    "aggregate_spearman": round(entry["aggregate"]["spearman"], 4),
                    "validate_wall_s": timing["wall_s"],
                }
            )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
