"""Overhead of ``GradientCollectorCallback`` on a Hugging Face ``Trainer`` run.

The same small recipe (the shipped tiny-pythia model and tokenizer, the first ``--rows``
documents of the shipped corpus cut to ``--max_length`` tokens, AdamW, batch 8 with 2
accumulation steps, ``--epochs`` epochs, CPU) is trained without and with the callback
(projection 16, rank-one normalizers from the live optimizer, float16 stores), each run in a
fresh process so that its peak RSS is its own. Runs alternate (plain, callback, plain, ...)
so that load on a shared machine hits both alike. Two figures: the fastest whole
``trainer.train()`` of each (imports and model loading excluded), and the median optimizer step
(from the first callback's ``on_step_begin`` to the last one's ``on_step_end``, over every
step of every round, plus the callback's end-of-epoch store writing spread over the steps),
which is steadier under the load spikes of a shared machine. One torch thread by default:
on a shared 2-core machine, 2-thread kernels stall waiting for each other, which swamps the
small kernels being compared. With ``--ranks N`` both runs are data parallel (torchrun, N CPU
processes with gloo; the batch is per rank) and the callback's time includes sending every
rank's rows to rank 0 at the end of each epoch. Prints one JSON object.

    python -m benchmarks.callback [--rows 256] [--epochs 2] [--rounds 2] [--threads 1] [--ranks 1]
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "bergson" / "assets"


def worker(args: argparse.Namespace) -> None:
    """One training run; prints a JSON line with its wall time and peak RSS."""
    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    from bergson import GradientCollectorCallback, prepare_for_gradient_collection

    model_dir = ASSETS / "tiny-pythia"
    tok = AutoTokenizer.from_pretrained(model_dir)
    with gzip.open(ASSETS / "corpus.jsonl.gz", "rt") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(args.rows), f)]
    ids = [tok(t)["input_ids"][: args.max_length] for t in texts]
    work = Path(args.workdir)
    training = TrainingArguments(
        output_dir=str(work / f"run-{args.worker}"),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        num_train_epochs=args.epochs,
        learning_rate=1e-3,
        optim="adamw_torch",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
    )
    from transformers import TrainerCallback

    steps: list[float] = []

    class StepStart(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

    class StepEnd(TrainerCallback):
        def __init__(self, start: StepStart):
            self.start = start

        def on_step_end(self, *a, **k):
            steps.append(time.perf_counter() - self.start.t)

    start_cb = StepStart()
    collector = None
    callbacks: list = [start_cb]
    if args.worker == "callback":
        collector = GradientCollectorCallback(work / "grads", overwrite=True)
        callbacks.append(collector)
    callbacks.append(StepEnd(start_cb))
    trainer = Trainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=training,
        train_dataset=Dataset.from_dict({"input_ids": ids}),
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        callbacks=callbacks,
    )
    if collector is not None:
        prepare_for_gradient_collection(trainer)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    result = {
        "wall_s": wall,
        "step_s": steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "tokens": sum(len(x) for x in ids),
        "steps": trainer.state.global_step,
    }
    if collector is not None:
        result["callback_self_s"] = collector._seconds
        result["epoch_write_s"] = collector._epoch_seconds
        stores = collector.stores
        result["store_mb"] = (
            sum(f.stat().st_size for s in stores for f in s.rglob("*") if f.is_file()) / 2**20
        )
    if trainer.args.process_index == 0:
        print("RESULT " + json.dumps(result), flush=True)


def run_worker(kind: str, args: argparse.Namespace, work: Path) -> dict:
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.ranks)]
    cmd = [
        sys.executable, *(launch if args.ranks > 1 else []), "-m", "benchmarks.callback",
        "--worker", kind, "--workdir", str(work),
        "--rows", str(args.rows), "--epochs", str(args.epochs), "--max_length", str(args.max_length),
        "--threads", str(args.threads),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{kind} run failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--worker", choices=["plain", "callback"], default=None)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bergson-callback-bench-"))
    runs: dict[str, list[dict]] = {"plain": [], "callback": []}
    for _ in range(args.rounds):
        for kind in ("plain", "callback"):
            runs[kind].append(run_worker(kind, args, work))
    plain = [r["wall_s"] for r in runs["plain"]]
    with_cb = [r["wall_s"] for r in runs["callback"]]
    ratios = [c / p for p, c in zip(plain, with_cb)]
    best = runs["callback"][with_cb.index(min(with_cb))]
    plain_step = statistics.median(t for r in runs["plain"] for t in r["step_s"])
    cb_step = statistics.median(t for r in runs["callback"] for t in r["step_s"])
    per_step_write = statistics.median(r["epoch_write_s"] / r["steps"] for r in runs["callback"])
    print(
        json.dumps(
            {
                "benchmark": "trainer_callback_overhead",
                "model": "tiny-pythia (2x64, vocab 8192, 1.1M parameters)",
                "rows": args.rows,
                "tokens_per_epoch": runs["plain"][0]["tokens"],
                "epochs": args.epochs,
                "optimizer_steps": runs["plain"][0]["steps"],
                "batch": "8 x 2 accumulation steps"
                + (f", on each of {args.ranks} ranks" if args.ranks > 1 else ""),
                "ranks": args.ranks,
                "threads": args.threads,
                "projection_dim": 16,
                "normalizer": "rank_one from the live AdamW state, every step",
                "plain_times_s": [round(t, 2) for t in plain],
                "callback_times_s": [round(t, 2) for t in with_cb],
                "overhead_ratio_best": round(min(with_cb) / min(plain) - 1, 4),
                "overhead_ratio_median_round": round(statistics.median(ratios) - 1, 4),
                "median_step_s_plain": round(plain_step, 4),
                "median_step_s_callback": round(cb_step, 4),
                "overhead_ratio_median_step": round((cb_step + per_step_write) / plain_step - 1, 4),
                "callback_self_s": round(best["callback_self_s"], 2),
                "peak_rss_mb_plain": round(min(r["peak_rss_mb"] for r in runs["plain"]), 1),
                "peak_rss_mb_callback": round(min(r["peak_rss_mb"] for r in runs["callback"]), 1),
                "store_mb": round(best["store_mb"], 2),
                "note": "wall time of trainer.train() only; each run in its own process",
            },
            indent=2,
        )
    )
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
