"""Where a GPU build's time goes, next to a plain training step of the same model on the same
batches: a ``torch.profiler`` breakdown of each (wall, GPU busy time, the top operators by device
and by host time, the host-device synchronisations) and timed variants of the build. Prints one
JSON object; with ``--trace DIR`` also writes gzipped Chrome traces of one build and one step.

    python -m benchmarks.gpu_profile [--shape 160m] [--num_docs 512] [--precision bf16] [--trace DIR]
    python -m benchmarks.gpu_profile --device cpu --shape 14m --num_docs 16 --repeats 1   # the script, on CPU

The variants (best of ``--repeats``, all alternated):

- ``build``: ``write_store`` as ``bergson build`` runs it, at ``--token_batch_size``;
- ``build_in_memory``: the same collection into an in-memory sink (no store on disk);
- ``train_step@B`` and ``build@B`` for each budget B of ``--budgets``: both at B tokens a batch,
  and ``by_budget`` their tokens/s and ratio (what the token budget buys on this device).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from bergson import DataConfig, IndexConfig, load_data, load_model, tokenize_documents
from bergson.collect.loop import collect_gradients
from bergson.data import plan_batches
from bergson.models import find_tracked_modules, numerics
from bergson.runs.shared_store import write_store

from .build import _sync, train_step_time
from .common import SHAPES, corpus_slice, pythia_shaped_dir

SYNC_OPS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaEventSynchronize")


def _timed(fn: Callable[[], Any]) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def _top(events: Any, key: str, n: int) -> list[dict[str, Any]]:
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:n]
    return [
        {
            "op": e.key[:80],
            "calls": e.count,
            "self_device_ms": round(e.self_device_time_total / 1e3, 2),
            "self_host_ms": round(e.self_cpu_time_total / 1e3, 2),
        }
        for e in rows
    ]


def profiled(fn: Callable[[], Any], trace: Path | None) -> dict[str, Any]:
    cuda = [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
    with profile(activities=[ProfilerActivity.CPU, *cuda]) as prof:
        wall = _timed(fn)
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events) / 1e6
    if trace is not None:
        raw = trace.with_suffix("")
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(trace, "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
    return {
        "wall_s_profiled": round(wall, 3),
        "device_busy_s": round(busy, 3),
        "device_busy_share": round(busy / wall, 3),
        "syncs": {e.key: e.count for e in events if e.key in SYNC_OPS},
        "top_device": _top(events, "self_device_time_total", 15),
        "top_host": _top(events, "self_cpu_time_total", 15),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=sorted(SHAPES), default="160m")
    p.add_argument("--num_docs", type=int, default=512)
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--token_batch_size", type=int, default=8192)
    p.add_argument("--budgets", type=int, nargs="*", default=[2048, 32768], help="more token budgets to time")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--trace", default=None, help="a folder for gzipped Chrome traces")
    p.add_argument("--device", default="cuda", help="cpu: a small check of the script itself")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu_profile: no CUDA device (--device cpu checks the script)")
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    out: dict[str, Any] = {"benchmark": "gpu_profile", "device": name}
    trace = Path(args.trace) if args.trace else None
    if trace is not None:
        trace.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bergson-gpuprof-") as tmp:
        root = Path(tmp)
        data = DataConfig(
            dataset=str(corpus_slice(root / "data.jsonl", args.num_docs)),
            truncation=True,
            max_length=args.max_length,
        )
        cfg = IndexConfig(
            run_path=str(root / "index"), model=str(pythia_shaped_dir(root / "m", args.shape)), data=data,
            device=args.device, precision=args.precision, token_batch_size=args.token_batch_size,
        )  # fmt: skip
        model, tok = load_model(cfg)
        docs = tokenize_documents(load_data(data), tok, data, args.token_batch_size)
        pad = tok.pad_token_id or 0
        modules = find_tracked_modules(model, cfg.modules)
        out["tokens"] = int(docs.lengths.sum())
        out["batches"] = len(plan_batches(docs.lengths, args.token_batch_size))

        def build(c: IndexConfig = cfg) -> None:
            shutil.rmtree(c.run_path, ignore_errors=True)
            write_store(c, model, docs, int(c.token_batch_size), pad)

        def in_memory() -> None:
            collect_gradients(
                model, docs, modules=modules, projection_dim=cfg.projection_dim,
                token_batch_size=int(cfg.token_batch_size), pad_token_id=pad, progress=False,
            )  # fmt: skip

        def train(budget: int) -> Callable[[], Any]:
            batches = plan_batches(docs.lengths, budget)
            return lambda: train_step_time(model, docs, batches, pad)

        legs: dict[str, Callable[[], Any]] = {
            "train_step": train(args.token_batch_size),
            "build": build,
            "build_in_memory": in_memory,
        }
        for budget in args.budgets:
            legs[f"train_step@{budget}"] = train(budget)
            legs[f"build@{budget}"] = partial(build, replace(cfg, token_batch_size=budget))
        times: dict[str, list[float]] = {k: [] for k in legs}
        with numerics(cfg):
            for fn in legs.values():
                fn()  # warm-up (kernels, allocator, the probe of the fused head)
            for _ in range(args.repeats):
                for name, fn in legs.items():
                    times[name].append(_timed(fn))
            out["best_s"] = {k: round(min(v), 3) for k, v in times.items()}
            out["times_s"] = {k: [round(x, 3) for x in v] for k, v in times.items()}
            out["build_over_train_ratio"] = round(min(times["train_step"]) / min(times["build"]), 3)
            out["by_budget"] = {}
            for budget in [args.token_batch_size, *args.budgets]:
                at = "" if budget == args.token_batch_size else f"@{budget}"
                step, built = min(times[f"train_step{at}"]), min(times[f"build{at}"])
                out["by_budget"][budget] = {
                    "train_step_tokens_per_s": round(out["tokens"] / step),
                    "build_tokens_per_s": round(out["tokens"] / built),
                    "build_over_train_ratio": round(step / built, 3),
                }
            out["profile_train_step"] = profiled(legs["train_step"], trace and trace / "train_step.json.gz")
            out["profile_build"] = profiled(build, trace and trace / "build.json.gz")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
