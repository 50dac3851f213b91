"""The prepared GPU check: build throughput against the card's FLOP ceiling, the numerics table
(build versus a plain training step), and the checks that need CUDA. Prints one JSON object.

    python -m benchmarks.gpu_checks --no_checks [--shape 160m] [--num_docs 512] [--repeats 2] [--budget_s 400]
    python -m benchmarks.gpu_checks --only_checks --shape 70m --num_docs 64
    python -m benchmarks.gpu_checks --device cpu --dry_run      # the non-CUDA parts, small, on CPU

1. **The table.** A Pythia-shaped model (default the 160M shape: width 768, 12 layers, the
   shipped 8k tokenizer), randomly initialised from a config, on the first ``--num_docs``
   documents of the shipped corpus, one row per numerics setting:

   - ``bf16``: bf16 weights;
   - ``fp32``: fp32 weights, TF32 off (matmuls and cuDNN);
   - ``fp32+tf32``: fp32 weights with ``--use_tf32_matmuls``;
   - ``bf16+math_sdp``: bf16 weights with ``--force_math_sdp`` (the math attention kernel).

   Each row times a plain training step (forward + backward with weight gradients, no optimizer:
   ``benchmarks.build.train_step_time``) and the build (the collection loop writing a store:
   ``write_store``) on the same batches, alternating (train, build, train, build, ...) after one
   untimed warm-up round, best of ``--repeats``; both legs run inside the row's
   ``bergson.models.numerics``. ``build_over_train_ratio`` is train time / build time.

2. **The FLOP ceiling.** N = the model's parameters less the input embedding (a table lookup
   costs no FLOPs; the output head is a matmul and counts). The build costs about 4·N FLOPs per
   token (forward 2N, backward through the activations 2N: the collection computes no weight
   gradients); a training step about 6·N. ``build_fraction_of_peak`` = 4·N·tokens / build
   seconds / peak, where peak is the card's dense FLOP/s for the row's dtype from
   :data:`PEAK_TFLOPS` (bf16 rows: bf16; fp32: fp32; fp32+tf32: tf32), or, for a card not in
   the table (and on CPU), a measured matmul peak (best of a few square matmuls in that dtype).
   ``build_ceiling_tokens_per_s`` = peak / (4·N). Attention-score FLOPs are not counted, so
   the fractions are slight underestimates.

3. **The checks** (CUDA only; ``--only_checks`` runs just these): ``--fsdp`` on one GPU equals an
   unsharded build, and int4 / int8 models (bitsandbytes) build, compared with fp32 by cosine.

Time on a GPU (``bash benchmarks/gpu.sh`` must stay under 10 minutes): the table does
4 rows x (1 warm-up + ``--repeats``) rounds of (6N + 4N) FLOPs per token. For the 160M shape
(N about 91M with the 8k vocabulary) and 512 documents (1.83e5 tokens after truncation to
512 tokens), one round costs 10 x 91e6 x 1.83e5 = 1.7e14 FLOPs, 12 rounds 2.0e15. The two fp32
rows (1.0e15) dominate: at 30% of an A100's 19.5 TFLOP/s fp32 that is 170 s, on an H100/H200
(67 TFLOP/s) about 50 s; the bf16 and TF32 rows run at tensor-core
rates and take seconds. Model creation and CUDA start add about 30 s. ``--budget_s`` (default
400) is the guard: a row is not started when the rows so far say it would end past the budget
(it is listed under ``skipped``), so the table ends by then even on a slower card; gpu.sh also
wraps each command in ``timeout``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bergson import (
    BergsonError,
    DataConfig,
    IndexConfig,
    build,
    diagnostics,
    load_data,
    load_model,
    tokenize_documents,
)
from bergson.config.commands import ModelConfigTestConfig
from bergson.data import plan_batches
from bergson.models import numerics
from bergson.runs.shared_store import write_store

from .build import train_step_time
from .common import SHAPES, corpus_slice, pythia_shaped_dir

# Dense (no structured sparsity) peak throughput in TFLOP/s, from NVIDIA's datasheets: the
# H200 datasheet (H200 SXM / H200 NVL), the H100 datasheet (H100 SXM / PCIe / NVL) and the A100
# datasheet (SXM and PCIe, 40 and 80 GB alike). The datasheets list the tensor-core figures
# "with sparsity"; the dense figures here are half of those. FP32 is the non-tensor-core figure.
# Keys are matched, in this order, as words of torch.cuda.get_device_name() ("NVIDIA H200",
# "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB", ...); another card
# (a GH200 too) gets a measured matmul peak.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200 NVL": {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H200": {"bf16": 989.5, "tf32": 494.5, "fp32": 67.0},
    "H100 NVL": {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H100 PCIe": {"bf16": 756.5, "tf32": 378.0, "fp32": 51.0},
    "H100": {"bf16": 989.5, "tf32": 494.5, "fp32": 67.0},  # SXM ("NVIDIA H100 80GB HBM3")
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}

# (row name, IndexConfig fields, the dtype whose peak bounds it)
ROWS: list[tuple[str, dict[str, Any], str]] = [
    ("bf16", {"precision": "bf16"}, "bf16"),
    ("fp32", {"precision": "fp32"}, "fp32"),
    ("fp32+tf32", {"precision": "fp32", "use_tf32_matmuls": True}, "tf32"),
    ("bf16+math_sdp", {"precision": "bf16", "force_math_sdp": True}, "bf16"),
]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def table_peak(name: str, kind: str) -> tuple[float, str] | None:
    """The datasheet peak FLOP/s of the card called ``name`` for ``kind`` (bf16 / tf32 / fp32)."""
    for key, peaks in PEAK_TFLOPS.items():
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", name):
            return peaks[kind] * 1e12, f"datasheet: {key} {kind} dense"
    return None


def measured_peak(device: str, kind: str, n: int, tries: int = 5) -> tuple[float, str]:
    """Best FLOP/s of an n x n matmul in ``kind`` (tf32: float32 with TF32 allowed)."""
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = kind == "tf32"
    try:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        (a @ b).sum().item()  # warm-up
        best = float("inf")
        for _ in range(tries):
            _sync(device)
            start = time.perf_counter()
            (a @ b).sum().item()
            best = min(best, time.perf_counter() - start)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    return 2 * n**3 / best, f"measured: best of {tries} {n}x{n} {kind} matmuls"


def flop_params(model: torch.nn.Module) -> int:
    """N: all parameters but the input embedding table (a lookup, no FLOPs)."""
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings()  # type: ignore[operator]
    return total - sum(p.numel() for p in embed.parameters())


def _set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def table(args: argparse.Namespace, root: Path, out: dict[str, Any]) -> None:
    model_dir = pythia_shaped_dir(root / f"pythia{args.shape}", args.shape)
    data = DataConfig(
        dataset=str(corpus_slice(root / "data.jsonl", args.num_docs)),
        truncation=True,
        max_length=args.max_length,
    )
    name = device_name(args.device)
    rows: dict[str, Any] = {}
    skipped: list[str] = []
    started = time.perf_counter()
    docs = None
    for row, fields, kind in ROWS:
        elapsed = time.perf_counter() - started
        if rows and elapsed / len(rows) * (len(rows) + 1) > args.budget_s:
            skipped.append(f"{row} (time budget {args.budget_s}s: {elapsed:.0f}s used by {len(rows)} rows)")
            continue
        _set_tf32(False)  # the process default; the tf32 row turns it on through numerics()
        cfg = IndexConfig(
            run_path=str(root / "index"), model=str(model_dir), data=data, device=args.device,
            projection_dim=args.projection_dim, token_batch_size=args.token_batch_size, **fields,
        )  # fmt: skip
        model, tok = load_model(cfg)
        if docs is None:
            docs = tokenize_documents(load_data(data), tok, data, args.token_batch_size)
        batches = plan_batches(docs.lengths, args.token_batch_size)
        tokens = int(docs.lengths.sum())
        n = flop_params(model)
        train_times, build_times = [], []
        with numerics(cfg):
            peak = None if args.device == "cpu" else table_peak(name, kind)
            if peak is None:
                peak = measured_peak(args.device, kind, 4096 if args.device.startswith("cuda") else 512)
            for i in range(args.repeats + (0 if args.dry_run else 1)):  # round 0: warm-up
                t = train_step_time(model, docs, batches, tok.pad_token_id or 0)
                shutil.rmtree(cfg.run_path, ignore_errors=True)
                _sync(args.device)
                start = time.perf_counter()
                write_store(cfg, model, docs, args.token_batch_size, tok.pad_token_id)
                _sync(args.device)
                b = time.perf_counter() - start
                if i > 0 or args.dry_run:
                    train_times.append(t)
                    build_times.append(b)
        best_train, best_build = min(train_times), min(build_times)
        rows[row] = {
            "dtype_of_peak": kind,
            "train_step_tokens_per_s": round(tokens / best_train, 1),
            "build_tokens_per_s": round(tokens / best_build, 1),
            "build_over_train_ratio": round(best_train / best_build, 3),
            "build_ceiling_tokens_per_s": round(peak[0] / (4 * n), 1),
            "build_fraction_of_peak": round(4 * n * tokens / best_build / peak[0], 4),
            "train_fraction_of_peak": round(6 * n * tokens / best_train / peak[0], 4),
            "peak_tflops": round(peak[0] / 1e12, 4),
            "peak_source": peak[1],
            "train_times_s": [round(x, 3) for x in train_times],
            "build_times_s": [round(x, 3) for x in build_times],
            "row_seconds": round(time.perf_counter() - started - elapsed, 1),
        }
        out["flop_params"] = n
        out["tokens"] = tokens
        out["documents"] = len(docs)
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    out["table"] = rows
    out["skipped"] = skipped
    out["table_seconds"] = round(time.perf_counter() - started, 1)


def checks(args: argparse.Namespace, root: Path, out: dict[str, Any]) -> None:
    """``--fsdp`` on one GPU equals an unsharded build; int4 / int8 (bitsandbytes) models build."""
    model = pythia_shaped_dir(root / f"pythia{args.shape}", args.shape)
    data = DataConfig(
        dataset=str(corpus_slice(root / "data.jsonl", args.num_docs)), truncation=True, max_length=256
    )
    base = IndexConfig(
        run_path=str(root / "plain"), model=str(model), data=data, precision="fp32", device=args.device,
        projection_dim=16, save_dtype="float32", token_batch_size=4096,
    )  # fmt: skip
    plain = build(base)
    sharded = build(replace(base, run_path=str(root / "fsdp"), fsdp=True))
    a, b = np.asarray(plain.all, np.float64), np.asarray(sharded.all, np.float64)
    out["fsdp_one_gpu_max_rel_diff"] = float(np.abs(a - b).max() / np.abs(a).max())
    # --token_batch_size auto: the GPU probe's choice, and a store equal to the explicit budget's
    start = time.perf_counter()
    auto = build(replace(base, run_path=str(root / "auto"), token_batch_size="auto"))  # type: ignore[arg-type]
    c = np.asarray(auto.all, np.float64)
    out["token_batch_size_auto"] = {
        "seconds": round(time.perf_counter() - start, 2),
        "record": auto.manifest.plan.get("token_batch_size_auto"),
        "max_rel_diff_to_4096": float(np.abs(c - a).max() / np.abs(a).max()),
    }
    # the numerical-consistency diagnostic on CUDA kernels (bf16 first; it escalates as needed)
    report = diagnostics.test_model_configuration(
        ModelConfigTestConfig(model=str(model), precision="bf16", device=args.device)
    )
    out["test_model_configuration_bf16"] = {
        key: report.get(key) for key in ("consistent", "consistent_as_configured", "recommended", "message")
    } | {
        "settings": [
            {k: s.get(k) for k in ("name", "status", "consistent", "padded_max_rel_error", "note")}
            for s in report["settings"]
        ]
    }
    for precision in ("int4", "int8"):
        start = time.perf_counter()
        try:
            q = build(replace(base, run_path=str(root / precision), precision=precision))  # type: ignore[arg-type]
        except BergsonError as e:
            out[precision] = {"error": str(e)}
            continue
        v = np.asarray(q.all, np.float64)
        cos = (v * a).sum(1) / (np.linalg.norm(v, axis=1) * np.linalg.norm(a, axis=1) + 1e-30)
        out[precision] = {
            "seconds": round(time.perf_counter() - start, 2),
            "finite": bool(np.isfinite(v).all()),
            "median_cosine_to_fp32": float(np.median(cos)),
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(SHAPES), default="160m")
    parser.add_argument("--num_docs", type=int, default=512)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--token_batch_size", type=int, default=8192)
    parser.add_argument("--projection_dim", type=int, default=16)
    parser.add_argument(
        "--budget_s", type=float, default=400, help="start no table row that would end past it"
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--only_checks", action="store_true", help="only the fsdp / int4 / int8 checks")
    parser.add_argument("--no_checks", action="store_true", help="only the table")
    parser.add_argument(
        "--dry_run",
        action="store_true",
        help="small and quick (14m shape, 16 documents, 1 round, no warm-up)",
    )
    args = parser.parse_args()
    if args.dry_run:
        args.shape, args.num_docs, args.repeats, args.max_length = "14m", 16, 1, 128
        args.token_batch_size = min(args.token_batch_size, 1024)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit(
            "benchmarks.gpu_checks: no CUDA device (use --device cpu --dry_run for the CPU parts)"
        )
    out: dict[str, Any] = {
        "benchmark": "gpu_checks",
        "device": device_name(args.device),
        "shape": f"pythia-{args.shape} {SHAPES[args.shape]} (hidden, layers, heads, intermediate)",
        "dry_run": args.dry_run,
    }
    with tempfile.TemporaryDirectory(prefix="bergson-gpu-") as tmp:
        if not args.only_checks:
            table(args, Path(tmp), out)
        if args.no_checks:
            pass
        elif cuda:
            (Path(tmp) / "checks").mkdir()
            checks(args, Path(tmp) / "checks", out)
        else:
            out["checks"] = "skipped: fsdp on one GPU and int4 / int8 need CUDA"
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
