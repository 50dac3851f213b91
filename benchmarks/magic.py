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
  and Pearson per query and averaged;
* ``queries`` (``--legs queries``): the cost of Q score columns. ``bergson magic --query_mode
  individual`` with the five shipped queries one pass each (``--query_batch_size 1``) and all
  five in one pass, and 16 queries (corpus rows) in one pass, each as seconds of reverse pass
  ÷ seconds of training in the same process (``timings.json``); and ``vjp``, one reverse step
  taken apart in one process (best of ``--repeats``, legs alternated): the replay step, the
  step's forward and create_graph gradient, the second backward for one cotangent, and Q = 5
  cotangents carried by a loop of backwards on the retained graph or by one vectorized
  (``is_grads_batched``) backward, in wall and process CPU seconds (CPU seconds are the steadier
  figure on a shared machine) and as ratios to a training step (``--legs vjp`` runs this alone).
  The vjp leg also times one micro-batch's Hessian-vector product and token-weight derivatives
  (what a reverse step needs from the gradient) by the replay's double backward, fused head and
  through the logits, and by forward-over-reverse (``torch.func.jvp`` of the gradient), and
  checks that the two orders agree.
* ``precision`` (``--legs precision``): the aggregated query's per-document scores of the recipe
  run in float32 against the same run in float64, in this process.

    python -m benchmarks.magic [--epochs 8] [--num_subsets 20] [--fractions 0.02 0.05] [--skip_quality]
    python -m benchmarks.magic --legs queries --epochs 1 --train_docs 48   # --legs vjp: the step alone

Prints one JSON object. The recipe is ``examples/magic/tiny.yaml`` (240 documents, 8 epochs of
30 steps: 240 optimizer steps) with ``--epochs`` epochs.
"""

from __future__ import annotations

import argparse
import json
import math
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


TRAIN_DOCS = 240
"""Training documents (``--train_docs``): the recipe's 240, or fewer for a quicker run of a leg."""


def overrides(epochs: int) -> list[str]:
    docs = [] if TRAIN_DOCS == 240 else ["--data.split", f"train[:{TRAIN_DOCS}]"]
    return ["--training.epochs", str(epochs), "--device", "cpu", *docs]


def train_only(plain: bool, epochs: int) -> None:
    """Child process: train the recipe without attribution and print its step count and time."""
    import torch

    from bergson.core.allocator import keep_freed_memory

    keep_freed_memory()  # as the ``bergson`` program does: the baseline runs as MAGIC does
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


def vjp_profile(epochs: int, repeats: int) -> None:
    """Child process: one reverse step of the recipe taken apart (seconds, best of ``repeats``)."""
    import torch

    from bergson.core.allocator import keep_freed_memory

    keep_freed_memory()
    from torch.func import functional_call

    from bergson.cli import parse
    from bergson.collect.losses import token_losses as position_losses
    from bergson.methods.magic.command import prepare
    from bergson.methods.magic.recipe import zero_slots_state
    from bergson.methods.magic.replay import Replay, math_attention, query_gradient, token_losses

    cfg = parse("magic", [str(CONFIG), *overrides(epochs)])
    model, tokenizer, docs, qdocs = prepare(cfg)
    pad = tokenizer.pad_token_id or 0
    replay = Replay(model, docs, cfg.training, pad, progress=False)
    s, w, t = replay.initial_state(), replay.ones(), min(10, replay.num_steps - 1)
    with torch.no_grad(), math_attention():
        for u in range(t):
            s, _ = replay.step(s, u, w)
    gen = torch.Generator().manual_seed(0)
    cots = []
    for j in range(len(qdocs)):  # mid-pass cotangents: the query gradient, small slot terms
        c = zero_slots_state(cfg.training, query_gradient(model, s.params, qdocs.select([j]), pad))
        for slot in c.slots.values():
            for k, v in slot.items():
                slot[k] = 1e-3 * torch.randn(v.shape, generator=gen, dtype=v.dtype).to(v.device)
        cots.append(c)
    stacked = cots[0].like([torch.stack(x) for x in zip(*(c.tensors() for c in cots))])
    one = cots[0].like([x[None] for x in cots[0].tensors()])

    def replay_step() -> None:
        with torch.no_grad(), math_attention():
            replay.step(s, t, w)

    def graph() -> tuple[Any, Any, Any]:
        leaf, ww = s.detached(requires_grad=True), w.detach().requires_grad_(True)
        with math_attention():
            new, _ = replay.step(leaf, t, ww, create_graph=True)
        outs = [o for o, c in zip(new.tensors(), cots[0].tensors()) if o.requires_grad]
        return (
            outs,
            [c for o, c in zip(new.tensors(), cots[0].tensors()) if o.requires_grad],
            [*leaf.tensors(), ww],
        )

    def second() -> float:
        outs, grads, inputs = graph()
        start = time.perf_counter()
        torch.autograd.grad(outs, inputs, grads, allow_unused=True)
        return time.perf_counter() - start

    # one micro-batch's Hessian-vector product and token-weight derivatives, three ways: the
    # replay's double backward (fused head), the same through the logits, and forward-over-reverse
    # (torch.func.jvp of the gradient; the fused head has no forward-mode rule, so the logits)
    mb = replay.micro_batches(t)[0]
    p0 = {k: v.detach() for k, v in s.params.items()}
    cg = {k: cots[0].params[k] for k in p0}
    wt = mb.mask.to(next(iter(p0.values())).dtype)

    def logits_losses(p: dict[str, Any]) -> Any:
        full = {n: q.detach() for n, q in model.named_parameters() if n not in p}
        full.update(p)
        logits = functional_call(model, full, (mb.ids,), {"use_cache": False}).logits
        return position_losses(logits, mb.target)

    def hvp_reverse(fused: bool) -> list[Any]:
        leaves = {k: v.clone().requires_grad_(True) for k, v in p0.items()}
        ww = wt.clone().requires_grad_(True)
        with math_attention():
            tl = token_losses(model, leaves, mb.ids, mb.target) if fused else logits_losses(leaves)
        g = torch.autograd.grad((tl * ww).sum(), list(leaves.values()), create_graph=True)
        return list(torch.autograd.grad(g, [*leaves.values(), ww], [cg[k] for k in leaves]))

    def hvp_forward() -> list[Any]:
        def grad_and_losses(p: dict[str, Any]) -> Any:
            def weighted(q: dict[str, Any]) -> Any:
                tl = logits_losses(q)
                return (tl * wt).sum(), tl

            return torch.func.grad(weighted, has_aux=True)(p)

        with math_attention():
            hv, dtl = torch.func.jvp(grad_and_losses, (p0,), (cg,))[1]
        return [*(hv[k] for k in p0), dtl]

    by_reverse, by_forward = hvp_reverse(True), hvp_forward()
    hvp_error = max(
        float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(by_reverse, by_forward)
    )

    legs = {
        "micro_batch_hvp_reverse_over_reverse_fused": lambda: hvp_reverse(True),
        "micro_batch_hvp_reverse_over_reverse_logits": lambda: hvp_reverse(False),
        "micro_batch_hvp_forward_over_reverse_logits": hvp_forward,
        "replay_step": replay_step,
        "forward_and_create_graph_gradient": graph,
        "vjp_q1": lambda: replay.step_vjp(s, t, w, one),
        "vjp_q5_loop": lambda: replay.step_vjp(s, t, w, stacked, "loop"),
        "vjp_q5_vmap": lambda: replay.step_vjp(s, t, w, stacked, "vmap"),
    }
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}  # process CPU seconds: less inflated than wall time on a shared machine
    for _ in range(repeats):
        for name, fn in legs.items():
            start, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name] = min(wall.get(name, math.inf), time.perf_counter() - start)
            cpu[name] = min(cpu.get(name, math.inf), time.process_time() - c0)
        wall["second_backward_q1"] = min(wall.get("second_backward_q1", math.inf), second())
    out = {
        "wall_s": {k: round(v, 4) for k, v in wall.items()},
        "cpu_s": {k: round(v, 4) for k, v in cpu.items()},
    }
    base = cpu["replay_step"]  # a training step: the no-graph step the replay runs
    out["cpu_over_training_step"] = {
        "reverse_step_q1": round((cpu["replay_step"] + cpu["vjp_q1"]) / base, 2),
        "reverse_step_q5_loop_per_query": round((cpu["replay_step"] + cpu["vjp_q5_loop"]) / 5 / base, 2),
        "reverse_step_q5_vmap_per_query": round((cpu["replay_step"] + cpu["vjp_q5_vmap"]) / 5 / base, 2),
    }
    out["micro_batch_hvp"] = {
        "tokens": int(mb.mask.sum()),
        "forward_over_reverse_against_reverse_max_relative_difference": hvp_error,
        "forward_over_reverse_over_reverse_logits_cpu": round(
            cpu["micro_batch_hvp_forward_over_reverse_logits"]
            / cpu["micro_batch_hvp_reverse_over_reverse_logits"],
            2,
        ),
        "forward_over_reverse_over_reverse_fused_cpu": round(
            cpu["micro_batch_hvp_forward_over_reverse_logits"]
            / cpu["micro_batch_hvp_reverse_over_reverse_fused"],
            2,
        ),
    }
    print(json.dumps(out))


def queries_leg(py: list[str], epochs: int, repeats: int, runs_too: bool) -> dict[str, Any]:
    """Q score columns: reverse-pass seconds per training second, per pass and per query."""
    log("one reverse step taken apart")
    m = measured("vjp", [*py, "benchmarks.magic", "--child", "vjp", "--epochs", str(epochs),
                         "--repeats", str(repeats), "--train_docs", str(TRAIN_DOCS)], "vjp.log")  # fmt: skip
    step = json.loads((WORK / "vjp.log").read_text().strip().splitlines()[-1])
    out: dict[str, Any] = {"vjp_step": step, "vjp_load_avg": m["load_avg"]}
    if not runs_too:
        return out
    corpus = ["--query.dataset", "bergson/assets/corpus.jsonl.gz", "--query.split", "train[300:316]",
              "--query.prompt_column", "text", "--query.completion_column", "None"]  # fmt: skip
    runs = {"q5_batch1": (5, 1, []), "q5_batch5": (5, 5, []), "q16_batch16": (16, 16, corpus)}
    for name, (q, size, extra) in runs.items():
        log(f"magic, {q} queries, --query_batch_size {size}")
        run = WORK / name
        cmd = [*py, "bergson", "magic", str(CONFIG), "--run_path", str(run), "--query_mode", "individual",
               "--query_batch_size", str(size), "--no-per_token", "--overwrite", *extra, *overrides(epochs)]  # fmt: skip
        m = measured(name, cmd, f"{name}.log")
        timings = json.loads((run / "timings.json").read_text())
        reverse = sum(v for k, v in timings.items() if k.startswith("reverse_") and k.endswith("_s"))
        out[name] = {
            "queries": q,
            "query_batch_size": size,
            "train_s": timings["train_s"],
            "reverse_s": round(reverse, 2),
            "reverse_per_query_over_train": round(reverse / q / timings["train_s"], 3),
            "magic_over_train": round((timings["train_s"] + reverse) / timings["train_s"], 3),
            "wall_s": m["wall_s"],
            "peak_rss_mb": m["peak_rss_mb"],
            "load_avg": m["load_avg"],
        }
    return out


def precision_leg(epochs: int) -> dict[str, Any]:
    """The recipe's aggregated-query metagradients in float32 against float64 (in this process):
    how far float32 rounding, AdamW's second moments of parameters whose gradient is zero in
    exact arithmetic (a key bias's) included, moves the scores."""
    import copy
    import tempfile

    import numpy as np
    import torch

    from bergson.cli import parse
    from bergson.methods.magic.command import prepare
    from bergson.methods.magic.replay import Replay, query_gradient
    from bergson.methods.magic.reverse import MagicRun
    from bergson.validation import correlations

    cfg = parse("magic", [str(CONFIG), *overrides(epochs)])
    model, tokenizer, docs, qdocs = prepare(cfg)
    pad = tokenizer.pad_token_id or 0
    per_doc, seconds = {}, {}
    for dtype in (torch.float64, torch.float32):
        log(f"precision: the recipe in {dtype}")
        m = copy.deepcopy(model).to(dtype)
        replay = Replay(m, docs, cfg.training, pad, progress=False)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            run = MagicRun(replay, Path(d), "sqrt")
            final, _ = run.train()
            cot = query_gradient(m, final.params, qdocs, pad)
            grads = run.reverse([cot], Path(d) / "progress.safetensors").token_grads[:, :1]
        per_doc[dtype] = replay.layout.per_document(grads.astype(np.float64))[:, 0]
        seconds[str(dtype)] = round(time.perf_counter() - start, 1)
    ref, low = per_doc[torch.float64], per_doc[torch.float32]
    return {
        "steps": run.total,
        "documents": len(docs),
        "max_difference_over_largest": float(np.abs(low - ref).max() / np.abs(ref).max()),
        **correlations(ref, low),
        "seconds": seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--num_subsets", type=int, default=20)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.02, 0.05])
    p.add_argument("--skip_quality", action="store_true")
    p.add_argument("--legs", nargs="+", choices=["cost", "vjp", "queries", "precision"], default=["cost"],
                   help="cost: training, plain and the three schedules (and quality); queries: Q columns; "
                   "precision: float32 against float64 scores")  # fmt: skip
    p.add_argument("--repeats", type=int, default=3, help="repeats of each leg of the vjp profile")
    p.add_argument("--train_docs", type=int, default=240, help="training documents (fewer: a quicker run)")
    p.add_argument("--child", choices=["train", "plain", "vjp"], help=argparse.SUPPRESS)
    args = p.parse_args()
    global TRAIN_DOCS
    TRAIN_DOCS = args.train_docs
    if args.child == "vjp":
        vjp_profile(args.epochs, args.repeats)
        return
    if args.child:
        train_only(args.child == "plain", args.epochs)
        return
    py = [sys.executable, "-m"]
    result: dict[str, Any] = {
        "recipe": f"{CONFIG.relative_to(REPO)} with {' '.join(overrides(args.epochs))}",
        "machine": {"cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M")},
    }
    if "vjp" in args.legs or "queries" in args.legs:
        result["queries"] = queries_leg(py, args.epochs, args.repeats, "queries" in args.legs)
    if "precision" in args.legs:
        result["precision"] = precision_leg(args.epochs)
    if "cost" not in args.legs:
        print(json.dumps(result, indent=2))
        return
    for child in ("train", "plain"):
        log(child)
        result[child] = measured(
            child,
            [
                *py,
                "benchmarks.magic",
                "--child",
                child,
                "--epochs",
                str(args.epochs),
                "--train_docs",
                str(TRAIN_DOCS),
            ],
            f"{child}.log",
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
