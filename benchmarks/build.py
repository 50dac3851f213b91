"""Throughput of ``bergson build`` (and ``bergson score`` against 16 queries) versus a plain
training step of the same model.

Both run in this process on the same batches (the build's own length-sorted token-budget
plan). The training step is forward + backward with weight gradients and no optimizer.
Runs alternate (train, build, train, build, ...) so that load on a shared machine hits
both alike; the best repeat of each is reported. Prints one JSON object.

    python -m benchmarks.build [--num_docs 1000] [--projection_dim 16] [--repeats 3] [--per_token]
        [--shape 14m|70m|160m | --model DIR] [--precision fp32|bf16] [--device cpu|cuda]
        [--include_output_head]

``--per_token`` adds a third leg to each round: the same build keeping one row per token
(its store holds tokens x dims numbers, so keep --num_docs modest). ``--include_output_head``
adds a leg that also tracks the output head (which the default build leaves out), to measure
what the head costs; ``--model bergson/assets/tiny-pythia`` runs the shipped example model
instead of a randomly initialised Pythia-shaped one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from bergson import DataConfig, IndexConfig, load_data, load_model, tokenize_documents
from bergson.collect.losses import per_document_loss
from bergson.config import ScoreConfig
from bergson.data import TokenizedDocs, plan_batches
from bergson.data.batching import pad_batch
from bergson.runs.shared_store import write_store
from bergson.scoring import score_documents
from bergson.store import load_gradients

from .common import SHAPES, corpus_slice, pythia_shaped_dir


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train_step_time(model: torch.nn.Module, docs, batches, pad_id: int) -> float:
    model.requires_grad_(True)
    device = next(model.parameters()).device
    _sync()
    start = time.perf_counter()
    for idx in batches:
        ids, labels = pad_batch(docs, idx, pad_id)
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids.to(device), use_cache=False).logits
        per_document_loss(logits, labels.to(device)).sum().backward()
    _sync()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num_docs", type=int, default=1000)
    parser.add_argument("--projection_dim", type=int, default=16)
    parser.add_argument("--token_batch_size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--per_token", action="store_true")
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), default="14m", help="Pythia size whose layer shapes to use"
    )
    parser.add_argument("--model", default=None, help="a model directory to use instead of --shape")
    parser.add_argument(
        "--include_output_head", action="store_true", help="also time a build that tracks the output head"
    )
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from bergson.core.allocator import keep_freed_memory

    keep_freed_memory()  # as the ``bergson`` program does (both legs run under it)
    torch.set_num_threads(args.threads)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bergson-bench-"))
    model_dir = (
        Path(args.model) if args.model else pythia_shaped_dir(work / f"pythia{args.shape}", args.shape)
    )
    data = corpus_slice(work / f"corpus{args.num_docs}.jsonl", args.num_docs)
    cfg = IndexConfig(
        run_path=str(work / "index"),
        model=str(model_dir),
        precision=args.precision,
        device=args.device,
        data=DataConfig(dataset=str(data), truncation=True),
        token_batch_size=args.token_batch_size,
        projection_dim=args.projection_dim,
    )
    model, tok = load_model(cfg)
    docs = tokenize_documents(load_data(cfg.data), tok, cfg.data, args.token_batch_size)
    batches = plan_batches(docs.lengths, args.token_batch_size)
    tokens = int(docs.lengths.sum())
    padded = int(sum(len(b) * docs.lengths[b].max() for b in batches))

    # 16 query documents (the first 16 of the corpus) for the score pass
    qcfg = replace(cfg, run_path=str(work / "query"))
    shutil.rmtree(qcfg.run_path, ignore_errors=True)
    qdocs = TokenizedDocs(docs.input_ids[:16], docs.loss_start[:16])
    write_store(qcfg, model, qdocs, args.token_batch_size, tok.pad_token_id)
    scfg = ScoreConfig(**{**vars(cfg), "run_path": str(work / "scores"), "query_path": qcfg.run_path})

    tcfg = replace(cfg, run_path=str(work / "tokens"), per_token=True)
    hcfg = replace(cfg, run_path=str(work / "with_head"), include_output_head=True)
    train_times, build_times, score_times, token_times, head_times = [], [], [], [], []
    for _ in range(args.repeats):
        if args.include_output_head:
            shutil.rmtree(hcfg.run_path, ignore_errors=True)
            start = time.perf_counter()
            write_store(hcfg, model, docs, args.token_batch_size, tok.pad_token_id)
            head_times.append(time.perf_counter() - start)
        if args.per_token:
            shutil.rmtree(tcfg.run_path, ignore_errors=True)
            start = time.perf_counter()
            write_store(tcfg, model, docs, args.token_batch_size, tok.pad_token_id)
            token_times.append(time.perf_counter() - start)
            shutil.rmtree(tcfg.run_path, ignore_errors=True)
        train_times.append(train_step_time(model, docs, batches, tok.pad_token_id or 0))
        shutil.rmtree(cfg.run_path, ignore_errors=True)
        start = time.perf_counter()
        write_store(cfg, model, docs, args.token_batch_size, tok.pad_token_id)
        build_times.append(time.perf_counter() - start)
        shutil.rmtree(scfg.run_path, ignore_errors=True)
        start = time.perf_counter()
        score_documents(
            scfg, model, docs, args.token_batch_size, load_gradients(qcfg.run_path), tok.pad_token_id
        )
        score_times.append(time.perf_counter() - start)

    best_train, best_build, best_score = min(train_times), min(build_times), min(score_times)
    with_head = {}
    if head_times:
        default, head = load_gradients(cfg.run_path).manifest, load_gradients(hcfg.run_path).manifest
        with_head = {
            "output_head": head.model["output_head"]["modules"],
            "modules_default": len(default.modules),
            "modules_with_head": len(head.modules),
            "row_dim_default": default.total_dim,
            "row_dim_with_head": head.total_dim,
            "build_with_head_tokens_per_s": round(tokens / min(head_times), 1),
            "build_with_head_over_build_time_ratio": round(min(head_times) / best_build, 3),
            "build_with_head_times_s": [round(t, 2) for t in head_times],
        }
    per_token = {}
    if token_times:
        per_token = {
            "per_token_build_tokens_per_s": round(tokens / min(token_times), 1),
            "per_token_over_build_ratio": round(best_build / min(token_times), 3),
            "per_token_times_s": [round(t, 2) for t in token_times],
        }
    print(
        json.dumps(
            {
                "benchmark": "build_vs_train_step",
                "model": str(args.model)
                if args.model
                else f"pythia-{args.shape}-shaped {SHAPES[args.shape]}, vocab {len(tok)}",
                "precision": args.precision,
                "device": str(next(model.parameters()).device),
                "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                "documents": len(docs),
                "tokens": tokens,
                "padding_overhead": round(padded / tokens - 1, 4),
                "projection_dim": args.projection_dim,
                "token_batch_size": args.token_batch_size,
                "threads": args.threads,
                "train_step_tokens_per_s": round(tokens / best_train, 1),
                "build_tokens_per_s": round(tokens / best_build, 1),
                "build_over_train_ratio": round(best_train / best_build, 3),
                "score_tokens_per_s": round(tokens / best_score, 1),
                "score_over_build_ratio": round(best_build / best_score, 3),
                "score_queries": 16,
                "train_times_s": [round(t, 2) for t in train_times],
                "build_times_s": [round(t, 2) for t in build_times],
                "score_times_s": [round(t, 2) for t in score_times],
                **per_token,
                **with_head,
                "note": "build = collection loop + writing the store, on the loaded model and tokenized docs",
            },
            indent=2,
        )
    )
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
