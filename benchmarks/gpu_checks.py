"""GPU checks of issue 8 that are not throughput: ``--fsdp`` on one GPU equals an unsharded
build, and int4 / int8 (bitsandbytes) models build. Prints one JSON object; needs CUDA.

    python -m benchmarks.gpu_checks --shape 70m --num_docs 64
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bergson import BergsonError, DataConfig, IndexConfig, build

from .common import corpus_slice, pythia_shaped_dir


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="70m")
    parser.add_argument("--num_docs", type=int, default=64)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu_checks needs CUDA")
    out: dict = {"gpu": torch.cuda.get_device_name(), "shape": args.shape}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = pythia_shaped_dir(root / "model", args.shape)
        data = DataConfig(
            dataset=str(corpus_slice(root / "data.jsonl", args.num_docs)), truncation=True, max_length=256
        )
        base = IndexConfig(
            run_path=str(root / "plain"), model=str(model), data=data, precision="fp32", device="cuda",
            projection_dim=16, save_dtype="float32", token_batch_size=4096,
        )  # fmt: skip
        plain = build(base)
        sharded = build(replace(base, run_path=str(root / "fsdp"), fsdp=True))
        a, b = np.asarray(plain.all, np.float64), np.asarray(sharded.all, np.float64)
        out["fsdp_one_gpu_max_rel_diff"] = float(np.abs(a - b).max() / np.abs(a).max())
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
    print(json.dumps(out))


if __name__ == "__main__":
    main()
