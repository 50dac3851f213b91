"""EK-FAC fitting's output-head kernels, bergson's against the plain forms they replace.

An output head 8192 wide (the benchmark model's) dominates EK-FAC fitting: Σ g gᵀ over tokens,
the eigendecomposition of that factor, and the rotations of the eigenvalue correction. For each
kernel this times the plain form (one full GEMM for Σ g gᵀ; ``Q_Sᵀ G_n Q_A`` per document;
float64 ``eigh``) and bergson's (lower-triangle blocks, :func:`bergson.transforms.ekfac.add_gram`;
the cheaper rotation order in one matmul per batch, :func:`~bergson.transforms.ekfac.add_corrections`;
float32 ``eigh`` of a wide float32 factor), alternating the two over ``--rounds`` rounds and
keeping the best, in process CPU seconds and wall seconds (with the 1-minute load average).
Prints one JSON object with the new/old ratios.

    python -m benchmarks.ekfac_kernels [--eigh_n 2048] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import torch

from bergson.transforms.ekfac import add_corrections, add_gram, symmetrise


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--width", type=int, default=8192, help="the head's output width")
    p.add_argument("--eigh_n", type=int, default=2048, help="width of the factor eigendecomposed")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    n_out, n_in, docs, length = args.width, 128, 8, 128
    x = torch.randn(docs, length, n_in)
    mask = torch.ones(docs, length, dtype=torch.bool)
    mask[:, 100:] = False  # 100 real tokens per document
    g = torch.randn(docs, length, n_out) * mask[..., None]
    qs, qa = torch.linalg.qr(torch.randn(n_out, n_out))[0], torch.linalg.qr(torch.randn(n_in, n_in))[0]
    cov = torch.randn(4 * args.eigh_n, args.eigh_n)
    cov = cov.T @ cov / len(cov)

    def gram_full() -> None:
        s, rows = torch.zeros(n_out, n_out), g[mask]
        s.addmm_(rows.T, rows)

    def gram_blocks() -> None:
        s = torch.zeros(n_out, n_out)
        add_gram(s, g[mask])
        symmetrise(s)

    def rotate_per_document() -> None:
        ((qs.T @ (g.mT @ x) @ qa) ** 2).sum(0)

    def rotate_batched() -> None:
        add_corrections({}, "head", (qs, qa), x, g, mask)

    legs: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {
        "covariance": (gram_full, gram_blocks),
        "correction": (rotate_per_document, rotate_batched),
        "eigh": (lambda: torch.linalg.eigh(cov.double()), lambda: torch.linalg.eigh(cov)),
    }
    best: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for kernel, pair in legs.items():
            for which in ("old", "new") if r % 2 == 0 else ("new", "old"):
                fn = pair[0] if which == "old" else pair[1]
                cpu, wall = time.process_time(), time.perf_counter()
                fn()
                got = [time.process_time() - cpu, time.perf_counter() - wall]
                key = f"{kernel}_{which}"
                best[key] = [min(a, b) for a, b in zip(best.get(key, got), got)]
    print(
        json.dumps(
            {
                "shapes": {"head": [n_out, n_in], "tokens": int(mask.sum()), "eigh_n": args.eigh_n},
                "best_s": {k: {"cpu": round(v[0], 2), "wall": round(v[1], 2)} for k, v in best.items()},
                "new_over_old_cpu": {k: round(best[f"{k}_new"][0] / best[f"{k}_old"][0], 3) for k in legs},
                "load_avg_1min": os.getloadavg()[0],
                "threads": torch.get_num_threads(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
