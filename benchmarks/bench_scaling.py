"""Scaling curves: how cost grows with the work, written as JSON + one PNG (experiments/bench/scaling.*).

  extraction  seconds per image vs the image side (square, 256-1024): DALG (dalg_cross) at 1 scale, DOLG
              (dolg_r50) at 1 and 5 scales, with the automatic inference options (dalg.inference), fp32 and
              bf16 as the machine chooses; FLOPs per image alongside (meta device);
  search      top-1000 search seconds and peak RSS vs database size (10k-1M fp16 rows of one memory-mapped file,
              70 queries, dalg.retrieval.index.search);
  evaluation  the product's full-ranking evaluation (rank_and_score: descriptors -> similarities -> scores) vs
              queries x database.

    python benchmarks/bench_scaling.py                      # ~4 min on 2 idle cores
    python benchmarks/bench_scaling.py --quick --out /tmp/s # tiny, seconds (tests use this)

Not a test: it prints figures and asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_eval  # noqa: E402
import bench_extraction  # noqa: E402
import bench_search_1m  # noqa: E402
from measure import PeakRSS, load_average  # noqa: E402

from dalg.inference import InferenceOptions, optimize_for_inference  # noqa: E402
from dalg.retrieval.evaluation import rank_and_score  # noqa: E402
from dalg.retrieval.index import search  # noqa: E402
from dalg.tools.model_table import build_model  # noqa: E402


def _best_of(fn, reps: int) -> float:
    fn()  # warm-up: first-call allocations and kernel selection are not the steady state
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def extraction_curve(models: list[tuple[str, tuple[float, ...]]], sides: list[int], reps: int, log) -> list:
    rows = []
    for name, scales in models:
        torch.manual_seed(0)
        plain = build_model(name, device="cpu").eval()
        meta = build_model(name, device="meta").eval()
        model = optimize_for_inference(plain, InferenceOptions())
        for side in sides:
            x = torch.randn(1, 3, side, side)
            with torch.inference_mode():
                s = _best_of(lambda m=model, x=x, sc=scales: m.extract(x, sc), reps)
            gflops = bench_extraction.count_extract_flops(meta, (3, side, side), scales) / 1e9
            rows.append(
                {
                    "model": name,
                    "scales": list(scales),
                    "side": side,
                    "seconds": s,
                    "gflops": gflops,
                    "options": repr(model.options),
                }
            )
            log(f"  extraction {name}@{len(scales)} {side}px: {s * 1e3:.0f} ms ({gflops:.1f} GFLOPs)")
    return rows


def search_curve(sizes: list[int], n_queries: int, dim: int, k: int, workdir: Path, log) -> list:
    rng = np.random.default_rng(0)
    queries = bench_search_1m._unit(rng.standard_normal((n_queries, dim)).astype(np.float32))
    path = workdir / f"scaling_{max(sizes)}x{dim}_fp16.npy"
    if not path.exists():
        bench_search_1m.write_distractors(path, max(sizes), dim, seed=0, chunk=65536)
    header = np.load(path, mmap_mode="r").offset
    rows = []
    for n in sizes:
        db = np.memmap(path, dtype=np.float16, mode="r", offset=header, shape=(n, dim))  # first n rows
        kk = min(k, n)
        with PeakRSS() as peak:
            s = _best_of(lambda db=db, kk=kk: search(queries, db, kk), 2)
        rows.append({"n_database": n, "seconds": s, "peak_rss_gib": peak.peak / 2**30, "k": kk})
        log(f"  search {n_queries} x {n:,}: {s:.3f} s, peak RSS {peak.peak / 2**30:.2f} GiB")
    return rows


def evaluation_curve(shapes: list[tuple[int, int]], log) -> list:
    rows = []
    for nq, n_db in shapes:
        q, db, gnd = bench_eval.make_descriptor_problem(nq, n_db)
        reps = 3 if nq * n_db <= 2_000_000 else 1  # the large shapes take seconds each
        s = _best_of(lambda q=q, db=db, gnd=gnd: rank_and_score(q, db, gnd), reps)
        rows.append({"n_queries": nq, "n_database": n_db, "cells": nq * n_db, "seconds": s})
        log(f"  evaluation {nq} x {n_db:,}: {s * 1e3:.1f} ms")
    return rows


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    by_model: dict[str, list] = {}
    for r in res["extraction"]:
        by_model.setdefault(f"{r['model']}@{len(r['scales'])}", []).append(r)
    for label, rs in by_model.items():
        ax[0].plot([r["side"] for r in rs], [r["seconds"] * 1e3 for r in rs], "o-", label=label)
    ax[0].set(xlabel="image side (px, square)", ylabel="ms per image", title="extraction", yscale="log")
    ax[0].legend()
    s = res["search"]
    ax[1].plot([r["n_database"] for r in s], [r["seconds"] for r in s], "o-", color="C0", label="seconds")
    ax[1].set(xscale="log", yscale="log", xlabel="database size", ylabel="seconds", title="top-k search")
    twin = ax[1].twinx()
    twin.plot([r["n_database"] for r in s], [r["peak_rss_gib"] for r in s], "s--", color="C3")
    twin.set_ylabel("peak RSS (GiB)", color="C3")
    e = res["evaluation"]
    ax[2].plot([r["cells"] for r in e], [r["seconds"] * 1e3 for r in e], "o-")
    for r in e:
        ax[2].annotate(f"{r['n_queries']}×{r['n_database']:,}", (r["cells"], r["seconds"] * 1e3), fontsize=7)
    ax[2].set(
        xscale="log", yscale="log", xlabel="queries × database", ylabel="ms", title="full-ranking evaluation"
    )
    fig.suptitle(f"{res['machine']} — load {res['load_start']} → {res['load_end']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=HERE.parent / "experiments" / "bench")
    ap.add_argument("--workdir", type=Path, default=None, help="where the database file goes (default: temp)")
    ap.add_argument(
        "--reps", type=int, default=2, help="timed extraction calls per point (best of; after warm-up)"
    )
    args = ap.parse_args(argv)
    if args.quick:
        models = [("dalg_tiny", (1.0,)), ("dolg_tiny", (1.0,))]
        sides, reps = [64, 128], 1
        sizes, shapes = [2_000, 8_000], [(10, 500), (20, 2_000)]
    else:
        five = bench_extraction.DOLG_SCALES
        models = [("dalg_cross", (1.0,)), ("dolg_r50", (1.0,)), ("dolg_r50", five)]
        sides, reps = [256, 384, 512, 768, 1024], args.reps
        sizes = [10_000, 30_000, 100_000, 300_000, 1_000_000]
        shapes = [(70, 5_000), (70, 20_000), (70, 80_000), (280, 20_000), (280, 80_000), (560, 80_000)]
    log = lambda s: print(s, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    res = {
        "command": "python benchmarks/bench_scaling.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "load_start": load_average(),
    }
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        res["evaluation"] = evaluation_curve(shapes, log)
        res["search"] = search_curve(sizes, 70, 512 if not args.quick else 64, 1000, workdir, log)
        res["extraction"] = extraction_curve(models, sides, reps, log)
    res["load_end"] = load_average()
    res["seconds"] = time.perf_counter() - t0
    res["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps(res, indent=2) + "\n")
    plot(res, args.out / "scaling.png")
    print(f"wrote {args.out / 'scaling.json'} and {args.out / 'scaling.png'} in {res['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
