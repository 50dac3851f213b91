"""Search throughput: exact top-k against memory bandwidth, and FAISS recall/latency.

1. Exact search. A synthetic float16 store (default 2M x 256 = 1 GiB, i.i.d. Gaussian
   rows; the values do not change the float32 scan's cost; ``--norm_decades D`` scales each row so
   that the norms span D orders of magnitude, which lets ``int8_prefilter`` pass over chunks of
   small rows) is written under a temporary directory and
   scanned with ``exact_topk`` for batches of 1, 16 and 64 queries. Throughput is GB of
   store scanned per second (bytes of float16 rows read, once per pass). Next to it,
   measured in the same run:

   - memory bandwidth: a large numpy copy (1 GiB float32 -> 1 GiB float32), counted as
     bytes read + bytes written per second;
   - GB scanned per CPU-second (process CPU time, all threads): on a shared machine,
     where this process gets only part of the cores, it shows what the code does with
     the CPU time it is given;
   - ``int8_prefilter``: the same exact search through the store's int8 copy, every row's score
     bounded from an integer matmul and only the rows that could be hits re-scored in float32
     (``gbps_best`` counts the float16 store's bytes, as above; ``int8_gbps_read`` the int8
     bytes actually read), whether it returned the float32 scan's answer, and which kernel made
     its exact integer products (``int8_kernel``: ``torch._int_mm`` or float32, whichever this
     CPU runs faster; ``--compare_int8_kernels`` also times it with each forced);
   - the compute roofline: single-threaded float32 matmul throughput on the kernel
     shape the search uses, times the worker threads. Scoring one float16 element costs
     2 * Q flops and 2 bytes, so a search can scan at most ``GFLOPS / Q`` GB/s. The same
     in bfloat16 (``compute_roofline_bf16_gbps``): the ceiling a store kept in a dtype the
     CPU multiplies natively would have (float16 rows must be converted first).

2. FAISS. A structured synthetic store (default 1M x 256 float16, a mixture of 1000
   Gaussian clusters: centres ~ N(0, I), within-cluster noise 2 * N(0, I), so clusters
   overlap: a row's noise (norm ~32) is larger than the distance between centres (~23)),
   queries drawn from the same mixture; raw inner-product scores. For each factory: build time, query latency (a batch of
   queries, per query; and one query at a time) and recall@10 against exact search, for
   several nprobe values.

The machine may be shared: load averages at the start and end are reported.
Prints one JSON object.

    python -m benchmarks.search [--rows 2000000] [--dim 256] [--faiss_rows 1000000] [--int8_rerank 4]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bergson.search import FaissConfig, exact_topk, int_matmul, load_or_build_index
from bergson.store import GradientStore, Manifest, ModuleLayout, StoreWriter, load_gradients


def write_store(path: Path, rows: int, dim: int, make_rows: Any, shard_size: int = 262_144) -> GradientStore:
    """A complete float16 store whose rows come from ``make_rows(start, stop)`` (float32)."""
    manifest = Manifest(
        kind="gradients",
        status="in_progress",
        model={"name": "synthetic-benchmark"},
        modules=[ModuleLayout("all", "Linear", [dim, 1], False, 0, dim)],
        projection={"kind": "none", "dim": 0, "seed": 0, "include_bias": False},
        normalizer=None,
        preconditioner=None,
        loss={"kind": "causal_lm", "reduction": "sum"},
        dtype="float16",
        num_rows=rows,
        data={"dataset": "synthetic", "rows": rows},
        plan={"shard_size": shard_size},
    )
    writer = StoreWriter(path, manifest, overwrite=True)
    num_shards = 0
    for i, start in enumerate(range(0, rows, shard_size)):
        stop = min(start + shard_size, rows)
        writer.begin_shard(i, range(start, stop))
        ids = np.arange(start, stop)
        writer.write(ids, make_rows(start, stop), np.ones(len(ids), np.int64), np.zeros(len(ids), np.float32))
        writer.end_shard(i)
        num_shards += 1
    writer.finalize(num_shards)
    return load_gradients(path)


def gaussian_rows(dim: int, norm_decades: float = 0.0) -> Any:
    """i.i.d. Gaussian rows; with ``norm_decades`` > 0 each row scaled by 10^U(-D+1, 1), so that the
    row norms span D orders of magnitude (as gradient stores' do)."""

    def make(start: int, stop: int) -> np.ndarray:
        rng = np.random.default_rng(start)
        x = rng.standard_normal((stop - start, dim), dtype=np.float32)
        if norm_decades > 0:
            x *= (10.0 ** rng.uniform(1 - norm_decades, 1, size=(stop - start, 1))).astype(np.float32)
        return x

    return make


@contextlib.contextmanager
def forced_int8_kernel(name: str) -> Any:
    """The int8 searches' integer products through ``name`` (``BERGSON_INT8_MATMUL``) meanwhile."""
    before = os.environ.get("BERGSON_INT8_MATMUL")
    os.environ["BERGSON_INT8_MATMUL"] = name
    int_matmul.reset()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("BERGSON_INT8_MATMUL", None)
        else:
            os.environ["BERGSON_INT8_MATMUL"] = before
        int_matmul.reset()


def best_and_median(fn: Any, repeats: int) -> tuple[float, float, float]:
    """Best and median wall time, and the least process CPU time (all threads) of a call."""
    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return min(times), statistics.median(times), min(cpu)


def copy_bandwidth(gib: float = 1.0, repeats: int = 5) -> dict[str, Any]:
    src = np.ones(int(gib * 2**30) // 4, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    best, median, _ = best_and_median(lambda: np.copyto(dst, src), repeats)
    moved = 2 * src.nbytes
    return {
        "method": f"np.copyto of {src.nbytes / 1e9:.2f} GB float32, single thread",
        "counted": "bytes read + bytes written",
        "gbps_best": moved / best / 1e9,
        "gbps_median": moved / median / 1e9,
    }


def matmul_gflops(
    q: int, dim: int, rows: int = 4096, repeats: int = 20, dtype: torch.dtype = torch.float32
) -> float:
    """Single-threaded [q, dim] x [dim, rows] in ``dtype``, the search's kernel shape."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(q, dim, dtype=dtype), torch.randn(rows, dim, dtype=dtype)
        out = torch.empty(q, rows, dtype=dtype)
        torch.mm(a, b.T, out=out)
        best, _, _ = best_and_median(lambda: torch.mm(a, b.T, out=out), repeats)
    finally:
        torch.set_num_threads(saved)
    return 2 * q * dim * rows / best / 1e9


def bench_exact(store: GradientStore, args: argparse.Namespace, bandwidth: float) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    dim = store.manifest.total_dim
    scanned = len(store) * dim * 2
    results = []
    for threads in args.threads:
        for num_q in args.queries:
            q = rng.standard_normal((num_q, dim)).astype(np.float32)
            first_start = time.perf_counter()
            exact_topk(store, q, 10, num_threads=threads)
            first = time.perf_counter() - first_start
            best, median, cpu = best_and_median(
                lambda q=q, threads=threads: exact_topk(store, q, 10, num_threads=threads), args.repeats
            )
            roofline = min(bandwidth, threads * matmul_gflops(num_q, dim) / num_q)
            entry: dict[str, Any] = {
                "queries": num_q,
                "threads": threads,
                "gbps_best": round(scanned / best / 1e9, 3),
                "gbps_median": round(scanned / median / 1e9, 3),
                "gbps_first_pass": round(scanned / first / 1e9, 3),
                "gb_per_cpu_second": round(scanned / cpu / 1e9, 3),
                "fraction_of_copy_bandwidth": round(scanned / best / 1e9 / bandwidth, 3),
                "compute_roofline_gbps": round(roofline, 3),
                "fraction_of_roofline": round(scanned / best / 1e9 / roofline, 3),
                # what a store the CPU multiplies natively would allow: the same kernel in bfloat16
                "compute_roofline_bf16_gbps": round(
                    min(bandwidth, threads * matmul_gflops(num_q, dim, dtype=torch.bfloat16) / num_q), 3
                ),
            }
            if args.int8_rerank:
                # the approximate scan, timed right after the exact one (same load), and its
                # recall@10 against the exact answer
                _, truth = exact_topk(store, q, 10, num_threads=threads)
                _, found = exact_topk(store, q, 10, num_threads=threads, int8_rerank=args.int8_rerank)
                best8, _, cpu8 = best_and_median(
                    lambda q=q, threads=threads: exact_topk(
                        store, q, 10, num_threads=threads, int8_rerank=args.int8_rerank
                    ),
                    args.repeats,
                )
                entry["int8_rerank"] = {
                    "factor": args.int8_rerank,
                    "gbps_best": round(scanned / best8 / 1e9, 3),
                    "gb_per_cpu_second": round(scanned / cpu8 / 1e9, 3),
                    "speedup_over_exact": round(best / best8, 3),
                    "fraction_of_copy_bandwidth": round(scanned / best8 / 1e9 / bandwidth, 3),
                    "recall_at_10": round(
                        float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])), 4
                    ),
                }
            # the exact search through the int8 copy's bounds: same answer, int8 rows read
            truth_s, truth = exact_topk(store, q, 10, num_threads=threads)
            found_s, found = exact_topk(store, q, 10, num_threads=threads, int8_prefilter=True)
            bestp, _, cpup = best_and_median(
                lambda q=q, threads=threads: exact_topk(
                    store, q, 10, num_threads=threads, int8_prefilter=True
                ),
                args.repeats,
            )
            entry["int8_prefilter"] = {
                "int8_kernel": int_matmul.kernel(num_q),
                "gbps_best": round(scanned / bestp / 1e9, 3),
                "int8_gbps_read": round(scanned / 2 / bestp / 1e9, 3),
                "gb_per_cpu_second": round(scanned / cpup / 1e9, 3),
                "speedup_over_exact": round(best / bestp, 3),
                "fraction_of_copy_bandwidth": round(scanned / bestp / 1e9 / bandwidth, 3),
                "same_as_exact": bool((found == truth).all() and np.allclose(found_s, truth_s, rtol=1e-6)),
            }
            if args.compare_int8_kernels:  # each kernel forced in turn, timed in this run
                by_kernel = {}
                for name in int_matmul.KERNELS:
                    with forced_int8_kernel(name):
                        bk, _, _ = best_and_median(
                            lambda q=q, threads=threads: exact_topk(
                                store, q, 10, num_threads=threads, int8_prefilter=True
                            ),
                            args.repeats,
                        )
                    by_kernel[name] = round(scanned / bk / 1e9, 3)
                entry["int8_prefilter"]["gbps_best_by_kernel"] = by_kernel
            results.append(entry)
            print(json.dumps(results[-1]), flush=True, file=sys.stderr)
    return {
        "store": {
            "rows": len(store),
            "dim": dim,
            "dtype": "float16",
            "gb": scanned / 1e9,
            "norm_decades": args.norm_decades,
        },
        "k": 10,
        "results": results,
    }


def bench_faiss(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    import faiss

    rows, dim, clusters = args.faiss_rows, args.dim, 1000
    default_threads = faiss.omp_get_max_threads()
    rng = np.random.default_rng(2)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)

    def mixture(n: int, gen: np.random.Generator) -> np.ndarray:
        labels = gen.integers(0, clusters, n)
        return centres[labels] + args.faiss_noise * gen.standard_normal((n, dim), dtype=np.float32)

    store = write_store(
        work / "faiss-store", rows, dim, lambda a, b: mixture(b - a, np.random.default_rng(1000 + a))
    )
    queries = mixture(args.faiss_queries, np.random.default_rng(3))
    start = time.perf_counter()
    _, truth = exact_topk(store, queries, 10)
    exact_time = time.perf_counter() - start

    def recall(found: np.ndarray) -> float:
        return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)]))

    out: dict[str, Any] = {
        "store": {
            "rows": rows,
            "dim": dim,
            "dtype": "float16",
            "data": f"{clusters} Gaussian clusters, centres N(0, I), noise {args.faiss_noise} N(0, I)",
        },
        "queries": args.faiss_queries,
        "metric": "inner product (raw, not unit-normalized)",
        "faiss_build_threads": faiss.omp_get_max_threads(),
        "exact_batch_seconds": round(exact_time, 3),
        "exact_ms_per_query_in_batch": round(1000 * exact_time / len(queries), 3),
        "indices": [],
    }
    for factory, nprobes in args.factories:
        cfg = FaissConfig(index_factory=factory, max_train_examples=args.max_train_examples)
        start = time.perf_counter()
        index = load_or_build_index(store, cfg)
        build = time.perf_counter() - start
        entry: dict[str, Any] = {
            "factory": factory,
            "max_train_examples": args.max_train_examples,
            "build_seconds": round(build, 2),
            "settings": [],
        }
        for nprobe in nprobes or [None]:
            if nprobe is not None:
                index.set_nprobe(nprobe)
            _, found = index.search(queries, 10)
            setting: dict[str, Any] = {"nprobe": nprobe, "recall_at_10": round(recall(found), 4)}
            for threads in args.faiss_threads:
                faiss.omp_set_num_threads(threads)
                index.search(queries[:4], 10)  # warm up
                batch, _, _ = best_and_median(lambda index=index: index.search(queries, 10), 3)
                single = []
                for q in queries[:20]:
                    t0 = time.perf_counter()
                    index.search(q[None], 10)
                    single.append(time.perf_counter() - t0)
                setting[f"threads_{threads}"] = {
                    "ms_per_query_in_batch": round(1000 * batch / len(queries), 3),
                    "ms_single_query_median": round(1000 * statistics.median(single), 3),
                }
            faiss.omp_set_num_threads(default_threads)
            entry["settings"].append(setting)
            print(json.dumps({factory: setting}), flush=True, file=sys.stderr)
        out["indices"].append(entry)
        del index
        shutil.rmtree(work / "faiss-store" / "faiss", ignore_errors=True)
    return out


def parse_factories(spec: str) -> list[tuple[str, list[int]]]:
    """'IVF1024,Flat@8/16/32;Flat' -> [('IVF1024,Flat', [8, 16, 32]), ('Flat', [])]."""
    out = []
    for part in spec.split(";"):
        factory, _, probes = part.partition("@")
        out.append((factory, [int(p) for p in probes.split("/") if p]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    parser.add_argument(
        "--threads",
        type=lambda s: [int(x) for x in s.split(",")],
        default=sorted({1, torch.get_num_threads()}),
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--int8_rerank",
        type=int,
        default=4,
        help="also time exact_topk(int8_rerank=F) and its recall; 0 skips",
    )
    parser.add_argument("--faiss_rows", type=int, default=1_000_000, help="0 skips the FAISS part")
    parser.add_argument("--faiss_queries", type=int, default=200)
    parser.add_argument("--faiss_noise", type=float, default=2.0, help="within-cluster noise scale")
    parser.add_argument(
        "--faiss_threads",
        type=lambda s: [int(x) for x in s.split(",")],
        default=sorted({1, torch.get_num_threads()}),
        help="FAISS (OpenMP) threads for the latency measurements",
    )
    parser.add_argument(
        "--factories",
        type=parse_factories,
        default=parse_factories("IVF1024,Flat@16/64/128/256;IVF1024,SQ8@128;Flat"),
    )
    parser.add_argument("--max_train_examples", type=int, default=65_536)
    parser.add_argument(
        "--norm_decades",
        type=float,
        default=0.0,
        help="exact search: scale each row so that the row norms span this many orders of magnitude "
        "(0: plain Gaussian rows)",
    )
    parser.add_argument(
        "--compare_int8_kernels",
        action="store_true",
        help="also time int8_prefilter with each integer-product kernel forced (torch._int_mm, float32)",
    )
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bergson-search-bench-"))
    load_start = os.getloadavg()
    try:
        bandwidth = copy_bandwidth()
        store = write_store(
            work / "exact-store", args.rows, args.dim, gaussian_rows(args.dim, args.norm_decades)
        )
        result: dict[str, Any] = {
            "machine": {
                "cpus": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "loadavg_start": [round(x, 2) for x in load_start],
            },
            "memory_bandwidth": {k: round(v, 2) if isinstance(v, float) else v for k, v in bandwidth.items()},
            "exact": bench_exact(store, args, bandwidth["gbps_best"]),
        }
        del store
        shutil.rmtree(work / "exact-store", ignore_errors=True)
        if args.faiss_rows > 0:
            result["faiss"] = bench_faiss(work, args)
        result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
