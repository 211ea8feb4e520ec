"""Benchmark: 70 queries against a small ground-truth set plus 1,000,000 random 512-d fp16 distractors.

The database is the ground-truth images (in memory) followed by the distractors (one fp16 ``.npy`` file
opened as a memory map), searched as one index space in chunks (``dalg.retrieval.index.search``), then scored with ``evaluate_revisited`` on the truncated top-k.
Prints seconds per phase, peak RSS, the fraction of the GEMM bound (the search's FLOPs at the same run's fp32
matmul peak) and a check of a few queries against a plain fp32 ranking (equal up to near-ties, 1e-6).

    python benchmarks/bench_search_1m.py                       # 1M distractors, file in a temp dir
    python benchmarks/bench_search_1m.py --n-distractors 100000 --workdir /tmp/bench --keep

Not a test: it prints figures and asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from measure import (  # benchmarks/measure.py (the script's folder is on sys.path)
    PeakRSS,
    matmul_gflops,
    process_peak_rss_bytes,
)

from dalg.retrieval.index import search, take_rows
from dalg.retrieval.metrics import evaluate_revisited, format_table


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_problem(n_gt: int, n_queries: int, dim: int, rng: np.random.Generator):
    """Ground-truth database vectors, queries near their positives, and Revisited-style gnd."""
    gt = _unit(rng.standard_normal((n_gt, dim)).astype(np.float32))
    gnd, queries = [], []
    order, used = rng.permutation(n_gt), 0  # disjoint labelled images per query
    for _ in range(n_queries):
        size = int(rng.integers(5, 40))
        if used + size > n_gt:
            raise ValueError(
                f"--n-gt {n_gt} is too small for {n_queries} queries with up to 40 labelled images each"
            )
        p, used = order[used : used + size], used + size
        ne, nh = len(p) // 3, len(p) // 3
        easy, hard, junk = p[:ne], p[ne : ne + nh], p[ne + nh :]
        # easy positives close to the query, junk farther, hard ones far enough (cos ~0.24) to meet the best
        # random distractors (max cos ~0.2 among 1M in 512-d): Hard mAP then depends on the distractors
        centre = _unit(rng.standard_normal((1, dim)).astype(np.float32))[0]
        for idx, spread in ((easy, 0.6), (hard, 4.0), (junk, 1.0)):
            gt[idx] = _unit(
                centre + spread * rng.standard_normal((len(idx), dim)).astype(np.float32) / np.sqrt(dim)
            )
        queries.append(centre)
        gnd.append({"easy": easy.tolist(), "hard": hard.tolist(), "junk": junk.tolist()})
    return gt, _unit(np.stack(queries)), gnd


def write_distractors(path: Path, n: int, dim: int, seed: int, chunk: int) -> None:
    """Random unit fp16 vectors as a .npy written with plain file writes (no memory map, so generation does
    not inflate RSS); depends only on (n, dim, seed), so --keep can reuse it."""
    rng = np.random.default_rng([seed, 1])
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        header = {
            "descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
            "fortran_order": False,
            "shape": (n, dim),
        }
        np.lib.format.write_array_header_1_0(f, header)
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            f.write(_unit(rng.standard_normal((m, dim), dtype=np.float32)).astype(np.float16).tobytes())
    os.replace(tmp, path)


def _numpy_gflops(n: int, min_seconds: float) -> float:
    """NumPy's (OpenBLAS) fp32 n x n matmul GFLOP/s: the library the CPU search's GEMMs run in."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    a @ a
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds:
        a @ a
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def faiss_route(queries: np.ndarray, database: list[np.ndarray], k: int, chunk_size: int) -> np.ndarray:
    """The previous CPU route, for a same-run "before": FAISS IndexFlatIP per chunk, merged by (score, index)."""
    from dalg.retrieval.index import _FaissBlasSettings, _FlatIP, _iter_chunks, _sort_candidates

    index = _FlatIP(queries.shape[1], use_gpu=False)
    best_s = np.full((queries.shape[0], 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((queries.shape[0], 0), dtype=np.int64)
    with _FaissBlasSettings(index.faiss):
        for start, chunk, _ in _iter_chunks(database, chunk_size):
            s, i = index.search(chunk, queries, min(k, chunk.shape[0]))
            cat_s, cat_i = (
                np.concatenate([best_s, s], 1),
                np.concatenate([best_i, i.astype(np.int64) + start], 1),
            )
            best_s, best_i = _sort_candidates(cat_s, cat_i, k)
    return best_i


def check_against_fp32(queries: np.ndarray, database: list[np.ndarray], k: int) -> dict:
    """The search's top-k of a few queries against a plain fp32 ranking (NumPy product, stable sort).

    Places may only differ where the two items' float64 scores are within 1e-6 (fp32 rounding of near-ties).
    """
    _, ranks = search(queries, database, k)
    full = np.concatenate([np.asarray(p, dtype=np.float32) @ queries.T for p in database]).T  # (nq, n_db)
    ref = np.argsort(-full, axis=1, kind="stable")[:, :k]
    diff = ranks != ref
    gap = 0.0
    if diff.any():
        rows = np.nonzero(diff)[0]
        rows_a, rows_b = take_rows(database, ranks[diff]), take_rows(database, ref[diff])
        q64 = queries[rows].astype(np.float64)
        gap = float(np.abs((rows_a * q64).sum(1) - (rows_b * q64).sum(1)).max())
    if gap > 1e-6:
        raise AssertionError(f"search differs from the fp32 reference beyond near-ties: score gap {gap}")
    return {"places": int(ranks.size), "differing_places": int(diff.sum()), "max_gap": gap}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-distractors", type=int, default=1_000_000)
    ap.add_argument(
        "--n-gt", type=int, default=5000, help="ground-truth database images (before distractors)"
    )
    ap.add_argument("--n-queries", type=int, default=70)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--k", type=int, default=1000, help="top-k kept per query (truncated evaluation)")
    ap.add_argument("--chunk-size", type=int, default=65536)
    ap.add_argument(
        "--workdir", type=Path, default=None, help="where the database file goes (default: temp dir)"
    )
    ap.add_argument("--keep", action="store_true", help="keep (and reuse) the database file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--check-queries", type=int, default=3, help="queries checked against a plain fp32 ranking"
    )
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument(
        "--compare-faiss",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the previous CPU route (FAISS IndexFlatIP per chunk) in the same run",
    )
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dalg_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    db_path = workdir / f"distractors_{args.n_distractors}x{args.dim}_fp16_s{args.seed}.npy"
    gt, queries, gnd = make_problem(args.n_gt, args.n_queries, args.dim, rng)
    gt = gt.astype(np.float16)  # the ground-truth images are stored like the distractors
    t0 = time.perf_counter()
    if not db_path.exists():
        write_distractors(db_path, args.n_distractors, args.dim, args.seed, args.chunk_size)
    t_gen = time.perf_counter() - t0
    n_db = args.n_gt + args.n_distractors
    rss_before = psutil.Process().memory_info().rss

    with PeakRSS() as peak:
        # ground truth first (in memory), then the memory-mapped distractors: one index space
        database = [gt, np.load(db_path, mmap_mode="r")]
        t0 = time.perf_counter()
        _, ranks = search(queries, database, args.k, chunk_size=args.chunk_size)
        t_search = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores = evaluate_revisited(ranks, gnd, n_database=n_db)
        t_eval = time.perf_counter() - t0

    print(
        format_table(
            scores, title=f"{args.n_queries} queries vs {args.n_gt:,} + {args.n_distractors:,} distractors"
        )
    )
    gib = 1024**3
    print(
        f"distractor file   : {db_path} ({db_path.stat().st_size / gib:.2f} GiB, fp16); database {n_db:,} x {args.dim}"
    )
    print(f"generation        : {t_gen:8.2f} s{' (reused file)' if t_gen < 0.01 else ''}")
    print(
        f"search (top-{args.k}) : {t_search:8.2f} s  ({n_db * args.n_queries / t_search / 1e6:.1f} M sims/s, "
        f"chunk {args.chunk_size:,}, cpus {os.cpu_count()})"
    )
    print(f"evaluate_revisited: {t_eval:8.3f} s")
    print(f"RSS before search : {rss_before / gib:8.3f} GiB")
    print(f"peak RSS (search+eval, sampled): {peak.peak / gib:.3f} GiB")
    lifetime = process_peak_rss_bytes()
    print(f"peak RSS (process lifetime, VmHWM): {lifetime / gib:.3f} GiB")
    print(f"target: peak RSS < 4 GiB -> {'OK' if lifetime < 4 * gib else 'OVER'}")

    # the GEMM bound: the search's 2 nq n_db dim FLOPs at this run's fp32 matmul peak (best of torch/NumPy)
    flops = 2.0 * args.n_queries * n_db * args.dim
    peak_gflops = max(matmul_gflops(2048, torch.float32, min_seconds=1.0), _numpy_gflops(2048, 1.0))
    bound = flops / (peak_gflops * 1e9)
    print(
        f"GEMM bound        : {bound:8.3f} s at the fp32 matmul peak {peak_gflops:.0f} GFLOP/s "
        f"-> search at {100 * bound / t_search:.0f}% of it"
    )
    faiss_seconds = None
    if args.compare_faiss:
        t0 = time.perf_counter()
        faiss_route(queries, database, args.k, args.chunk_size)
        faiss_seconds = time.perf_counter() - t0
        print(
            f"FAISS route (before): {faiss_seconds:8.2f} s -> {faiss_seconds / t_search:.2f}x slower, same run"
        )
    exact = check_against_fp32(queries[: args.check_queries], database, args.k)
    print(
        f"fp32 reference    : {args.check_queries} queries, {exact['differing_places']} of "
        f"{exact['places']} places differ, largest score gap there {exact['max_gap']:.1e} (tolerance 1e-6)"
    )
    if args.json is not None:
        record = {
            "n_queries": args.n_queries,
            "n_database": n_db,
            "dim": args.dim,
            "k": args.k,
            "search_seconds": round(t_search, 3),
            "evaluate_seconds": round(t_eval, 4),
            "peak_rss_gib": round(peak.peak / gib, 3),
            "process_peak_rss_gib": round(lifetime / gib, 3),
            "generation_seconds": round(t_gen, 2),
            "fp32_matmul_peak_gflops": peak_gflops,
            "gemm_bound_seconds": bound,
            "fraction_of_gemm_bound": bound / t_search,
            "exactness_vs_fp32": exact,
            "faiss_route_seconds": faiss_seconds,
            "mAP": scores.map,
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
