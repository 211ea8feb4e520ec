"""`make bench`: DALG's efficiency claim measured side by side, in one run, on this machine.

Sections (each writes experiments/bench/<section>.json; the markdown table goes to experiments/bench/results.md):
  extraction  images/s, latency and achieved GFLOP/s at the test size: dalg_cross @1 scale, dolg_r50 @5 and @1
              scales, same photos, variants interleaved; before (plain) and after (dalg.inference) figures;
              the dense matmul GFLOP/s of the machine measured between rounds
  train       training-step images/s and peak memory of the tiny CPU config (model=dalg_tiny)
  loader      benchmarks/bench_loader.py (data engineer's) at the tiny config's sizes, then bench_decode.py
              (640x480 / 1024x768 / 1600x1200 JPEGs to 512 per decoder, one worker), as subprocesses (~2 min)
  eval        revisited mAP from given similarities, 70 x 5,000: dalg.retrieval vs a per-query NumPy reference
  search_1m   benchmarks/bench_search_1m.py (70 queries vs 5,000 + 1M distractors), run as a subprocess
  scaling     (opt-in: --sections scaling, ~4 min) benchmarks/bench_scaling.py: extraction vs image side, search
              time/RSS vs database size, evaluation vs queries x database -> scaling.json + scaling.png

    python benchmarks/run_all.py                 # the five default sections (~13 min on 2 idle cores)
    python benchmarks/run_all.py --no-compile    # without torch.compile (~6 min less)
    python benchmarks/run_all.py --skip-1m       # without the 1M search
    python benchmarks/run_all.py --quick --out /tmp/bench   # tiny configs, seconds (tests use this)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import bench_eval  # noqa: E402
import bench_extraction  # noqa: E402
from measure import load_average, machine_facts  # noqa: E402

from dalg.inference import InferenceOptions  # noqa: E402

SECTIONS = ("extraction", "train", "loader", "eval", "search_1m", "scaling")
DEFAULT_SECTIONS = SECTIONS[:5]  # scaling is opt-in: make bench stays within its 15 minutes
# Measured in this order (the table keeps SECTIONS' order): the short sections first. Right after the 10-minute
# extraction section (its parent process then holds ~6 GB) the training step ran 160-190 img/s against 220-250
# alone on the same idle machine (experiments/bench/NOTES.md, session 6).
RUN_ORDER = ("train", "loader", "eval", "search_1m", "extraction", "scaling")
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "landmarks-mini" / "jpg"


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")
    os.replace(tmp, path)


def extraction_variants(quick: bool, with_compile: bool, max_batch: int) -> list[bench_extraction.Variant]:
    V, Opt = bench_extraction.Variant, InferenceOptions
    dalg, dolg = ("dalg_tiny", "dolg_tiny") if quick else ("dalg_cross", "dolg_r50")
    five = bench_extraction.DOLG_SCALES
    auto = Opt()  # the defaults an eval script gets: channels-last for CNNs, bf16 where it is fast
    out: list[bench_extraction.Variant] = []
    for model, scales, tag in (
        (dalg, (1.0,), f"{dalg}@1"),
        (dolg, five, f"{dolg}@5"),
        (dolg, (1.0,), f"{dolg}@1"),
    ):
        cnn = model.startswith("dolg")
        out.append(V(model, scales, None, tag=tag))
        if not quick:  # the smoke run keeps only before / after
            out.append(V(model, scales, Opt(channels_last=cnn, bf16=False), tag=tag))
            out.append(V(model, scales, Opt(channels_last=cnn, bf16=True), tag=tag))
        out.append(V(model, scales, auto, max_batch=max_batch, tag=tag))
        if not quick:  # float32 batched too: the fraction of the float32 peak of a throughput run
            out.append(V(model, scales, Opt(channels_last=cnn, bf16=False), max_batch=max_batch, tag=tag))
        # compile at one scale only: every (batch, shape, scale) is its own graph, ~35 s each on 2 cores
        if with_compile and len(scales) == 1:
            compiled = Opt(channels_last=cnn, bf16=False, compile=True)
            out.append(V(model, scales, compiled, tag=tag))
            out.append(V(model, scales, compiled, max_batch=max_batch, tag=tag))
    return out


def run_extraction(args, device: torch.device) -> dict[str, Any]:
    image_dir = None if args.synthetic_images else Path(args.image_dir)
    if image_dir is not None and not image_dir.is_dir():
        print(f"  {image_dir} not found: using synthetic views instead", flush=True)
        image_dir = None
    _, names = bench_extraction.load_images(image_dir, args.images, args.size)
    print(f"  {len(names)} images at longer side {args.size}", flush=True)

    def images_for(model):  # each model gets its own normalisation and size multiple (input_config.py)
        return bench_extraction.load_images(
            image_dir, args.images, args.size, input_config=model.input_config
        )[0]

    variants = extraction_variants(args.quick, args.compile, args.max_batch)
    res = bench_extraction.run(
        variants,
        images_for,
        args.rounds,
        device,
        matmul_n=args.matmul_n,
        peak_seconds=0.1 if args.quick else 1.0,
        log=lambda s: print(s, flush=True),
    )
    res.update(
        n_images=len(names),
        images=names,
        image_source=str(image_dir) if image_dir else "synthetic generator views",
        test_size=args.size,
        rounds=args.rounds,
    )
    rows = res["variants"]
    tags = list(dict.fromkeys(r["tag"] for r in rows))
    dalg_tag, dolg5_tag, dolg1_tag = tags[0], tags[1], tags[2]
    summary = {}
    for opt in (False, True):
        key = "optimised" if opt else "plain"
        d, d5, d1 = (bench_extraction.best(rows, t, opt) for t in (dalg_tag, dolg5_tag, dolg1_tag))
        summary[key] = {
            "dalg": d["how"],
            "dolg5": d5["how"],
            "dolg1": d1["how"],
            "dalg_images_per_s": d["images_per_s"],
            "dolg5_images_per_s": d5["images_per_s"],
            "dolg1_images_per_s": d1["images_per_s"],
            "ratio_dalg_over_dolg5": d["images_per_s"] / d5["images_per_s"],
            "ratio_dalg_over_dolg1": d["images_per_s"] / d1["images_per_s"],
            "flop_ratio_dolg5_over_dalg": d5["gflops_per_image"] / d["gflops_per_image"],
            "dalg_fraction_of_matmul_peak": d["fraction_of_matmul_peak"],
            "dalg_dtype": d["dtype"],
        }
    summary.update(round_two_goals(rows, dalg_tag, dolg5_tag, res["matmul_peak_gflops_per_s"]))
    res["summary"] = summary
    return res


def round_two_goals(
    rows: list[dict], dalg_tag: str, dolg5_tag: str, peak: dict[str, float]
) -> dict[str, Any]:
    """Issue 16's items 1-3 from the extraction rows: bf16 DALG against the bf16 matmul peak (batched by shape,
    with or without compile), eager float32 one image at a time against the float32 peak, and DALG's images/s over
    DOLG-5's against the FLOP ratio (per-FLOP efficiency, the best non-compiled rows of each)."""
    out: dict[str, Any] = {}

    def fastest(pred) -> dict | None:
        found = [r for r in rows if pred(r)]
        return max(found, key=lambda r: r["images_per_s"]) if found else None

    bf16 = fastest(lambda r: r["tag"] == dalg_tag and r["dtype"] == "bfloat16")
    if bf16 and "bfloat16" in peak:
        out["bf16"] = {
            "dalg": bf16["how"],
            "dalg_achieved_gflops_per_s": bf16["achieved_gflops_per_s"],
            "bf16_matmul_peak_gflops_per_s": peak["bfloat16"],
            "dalg_fraction_of_bf16_peak": bf16["achieved_gflops_per_s"] / peak["bfloat16"],
            "one_minus_min_cosine_to_fp32": None
            if bf16["min_cosine_to_plain"] is None
            else 1 - bf16["min_cosine_to_plain"],
            "goal": 0.40,
        }
    eager = fastest(
        lambda r: (
            r["tag"] == dalg_tag
            and r["dtype"] == "float32"
            and r["max_batch"] in (None, 1)
            and "compile" not in r["options"]
        )
    )
    if eager and "float32" in peak:
        out["eager_fp32_single"] = {
            "dalg": eager["how"],
            "dalg_fraction_of_fp32_peak": eager["achieved_gflops_per_s"] / peak["float32"],
            "goal": 0.65,
        }
    d = bench_extraction.best(rows, dalg_tag, True)
    d5 = bench_extraction.best(rows, dolg5_tag, True)
    if d and d5:
        ratio = d["images_per_s"] / d5["images_per_s"]
        flop_ratio = d5["gflops_per_image"] / d["gflops_per_image"]
        out["per_flop"] = {
            "dalg": d["how"],
            "dolg5": d5["how"],
            "ratio_dalg_over_dolg5": ratio,
            "flop_ratio_dolg5_over_dalg": flop_ratio,
            "dalg_efficiency_relative_to_dolg": ratio / flop_ratio,  # goal: >= 1
            "goal": 1.0,
        }
    return out


def run_train(args, device: torch.device) -> dict[str, Any]:
    """bench_train.py in its own process: its peak memory is that of a process that only trains."""
    quick = ["--steps", "2", "--warmup", "1", "--batch-size", "8", "--size", "64"]
    with tempfile.TemporaryDirectory(prefix="bench-run-all-") as tmp:
        out_json = Path(tmp) / "train.json"
        cmd = [
            "benchmarks/bench_train.py",
            "--model",
            "dalg_tiny",
            *(quick if args.quick else []),
            "--device",
            str(device),
            "--json",
            str(out_json),
        ]
        proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        res = json.loads(out_json.read_text())
    res["command"] = "python " + " ".join(cmd[:-2])
    print(
        f"  train {res['model']} batch {res['batch_size']} @{res['train_size']}px: {res['images_per_s']:.1f} img/s,"
        f" peak RSS {res['process_peak_rss_mib']:.0f} MiB",
        flush=True,
    )
    return res


def run_loader(args) -> dict[str, Any]:
    """bench_loader.py at the default run's sizes (128 px images, 96 px crops, batch 64, model=dalg_tiny)."""
    quick = ["--n-images", "32", "--batch-size", "8", "--batches", "2", "--steps", "1", "--workers", "0"]
    full = ["--n-images", "256", "--batch-size", "64", "--batches", "3", "--steps", "3", "--workers", "0,2"]
    with tempfile.TemporaryDirectory(prefix="bench-run-all-") as tmp:
        out_json = Path(tmp) / "loader.json"
        cmd = [
            "benchmarks/bench_loader.py",
            "--image-size",
            "128",
            "--train-size",
            "96",
            *(quick if args.quick else full),
            "--json",
            str(out_json),
        ]
        proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        res = json.loads(out_json.read_text())
    res["command"] = "python " + " ".join(c for c in cmd[:-2])
    for r in res["results"]:
        print(
            f"  loader workers={r['workers']}: augmented {r['augmented_img_s']:.1f} img/s"
            + (f", waiting for data {100 * r['wait_share']:.0f}% of a step" if "wait_share" in r else ""),
            flush=True,
        )
    # realistic JPEG sizes decoded and augmented to 512 by one worker, per decoder (bench_decode.py)
    dec_args = ["--sizes", "640x480", "--n-images", "4", "--rounds", "1"] if args.quick else []
    dec = bench_decode_run(dec_args)
    res["decode"] = dec
    for key in ("speedup_vs_plain_pil_1600", "winner_1600", "gpu_workers_1600"):
        if key in dec:
            res[key] = dec[key]
    return res


def run_scaling(args) -> dict[str, Any]:
    """bench_scaling.py in its own process (its search RSS is its own); writes scaling.{json,png} into --out."""
    cmd = ["benchmarks/bench_scaling.py", *(["--quick"] if args.quick else []), "--out", str(args.out)]
    proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    print(proc.stdout.rstrip(), flush=True)
    res = json.loads((args.out / "scaling.json").read_text())
    res["command"] = "python " + " ".join(cmd[:-2])
    return res


def bench_decode_run(extra: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-run-all-") as tmp:
        out_json = Path(tmp) / "decode.json"
        cmd = ["benchmarks/bench_decode.py", *extra, "--json", str(out_json)]
        proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        dec = json.loads(out_json.read_text())
    dec["command"] = "python " + " ".join(cmd[:-2])
    print(proc.stdout.split("{")[0].rstrip(), flush=True)
    return dec


def run_search_1m(args) -> dict[str, Any]:
    n = 20_000 if args.quick else args.n_distractors
    with tempfile.TemporaryDirectory(prefix="bench-run-all-") as tmp:
        out_json = Path(tmp) / "search_1m.json"
        cmd = [
            sys.executable,
            str(HERE / "bench_search_1m.py"),
            "--n-distractors",
            str(n),
            "--json",
            str(out_json),
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        record = json.loads(out_json.read_text())
    text = proc.stdout

    def grab(pattern: str) -> float | None:
        m = re.search(pattern, text)
        return float(m.group(1)) if m else None

    out = {
        "command": " ".join(["python", "benchmarks/bench_search_1m.py", "--n-distractors", str(n)]),
        "n_distractors": n,
        "wall_seconds": wall,
        "generation_seconds": grab(r"generation\s*:\s*([\d.]+) s"),
        "search_seconds": grab(r"search \(top-\d+\)\s*:\s*([\d.]+) s"),
        "evaluate_seconds": grab(r"evaluate_revisited:\s*([\d.]+) s"),
        "peak_rss_gib": grab(r"peak RSS \(search\+eval, sampled\):\s*([\d.]+) GiB"),
        **record,
        "stdout": text,
    }
    print(
        f"  1M search: {out['search_seconds']} s search, {out['evaluate_seconds']} s evaluate, "
        f"peak RSS {out['peak_rss_gib']} GiB",
        flush=True,
    )
    return out


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "–" if x is None else format(x, fmt)


def _model_words(model: dict[str, Any]) -> str:
    """'vit_tiny_patch16_224 (depth 6, embed_dim 128) + CrossAttentionFusion, 336 steps' from a fidelity record."""
    bb = dict(model.get("backbone") or {})
    name = bb.pop("name", "?")
    extra = ", ".join(f"{k} {v}" for k, v in bb.items() if isinstance(v, (int, float, str)))
    fusion = str(model.get("fusion") or "?").rsplit(".", 1)[-1]
    return f"{name}{f' ({extra})' if extra else ''} + {fusion}, {model.get('global_step')} steps"


def _section(title: str, res: dict[str, Any]) -> list[str]:
    """A section's heading and its when/how/load line."""
    return [f"## {title}", "", _measured(res), ""]


def _measured(res: dict[str, Any]) -> str:
    return (
        f"*Measured {res.get('measured_at', '?')} in {res.get('seconds', float('nan')):.0f} s by `{res.get('run_command')}`;"
        f" load average {res.get('load_start')} → {res.get('load_end')}.*"
    )


def markdown(results: dict[str, Any], command: str) -> str:
    env = results["environment"]
    lines = [
        "# Benchmarks (`make bench` = `python benchmarks/run_all.py`)",
        "",
        f"Machine: {env['machine']['cpu']}, {env['machine']['cpu_count']} CPUs, torch {env['machine']['torch']},"
        f" {env['machine']['torch_threads']} threads, device {env['machine']['device']}. Each section says when, "
        "by which command and under which load average (1/5/15 min) it was measured; `--sections` re-runs "
        "some, `--table-only` rebuilds this file from the JSONs.",
        "",
    ]
    ex = results.get("extraction")
    if ex:
        peak = ex["matmul_peak_gflops_per_s"]
        lines += [
            *_section("Extraction at the test size", ex),
            f"{ex['n_images']} images ({ex['image_source']}, own aspect ratios, longer side {ex['test_size']})"
            f", {ex['rounds']} interleaved rounds, medians. Dense matmul ({ex['matmul_n']}²) in the same run, "
            "between rounds: "
            + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peak.items())
            + (
                (
                    "; a GEMM of ViT-S's own MLP shape ("
                    + "×".join(map(str, ex["vit_s_gemm_shape"]))
                    + "): "
                    + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in ex["vit_s_gemm_gflops_per_s"].items())
                )
                if "vit_s_gemm_gflops_per_s" in ex
                else ""
            )
            + ".",
            "",
            "| model @ scales | how | images/s | latency ms (1 image) | GFLOPs / image | achieved GFLOP/s "
            "| of matmul peak (same dtype) | 1 − min cos to plain |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in ex["variants"]:
            lines.append(
                f"| {r['tag']} | {r['how']} | {r['images_per_s']:.3f} | {_f(r['latency_ms_median'], '.0f')} | "
                f"{r['gflops_per_image']:.1f} | {r['achieved_gflops_per_s']:.1f} | "
                f"{_f(r['fraction_of_matmul_peak'] and 100 * r['fraction_of_matmul_peak'], '.0f')}% | "
                f"{_f(None if r['min_cosine_to_plain'] is None else 1 - r['min_cosine_to_plain'], '.1e')} |"
            )
        lines.append("")
        dalg_fp32 = [
            r for r in ex["variants"] if r["tag"] == ex["variants"][0]["tag"] and r["dtype"] == "float32"
        ]
        vit = ex.get("vit_s_gemm_gflops_per_s", {})
        if dalg_fp32 and "float32" in peak:
            b = max(dalg_fp32, key=lambda r: r["achieved_gflops_per_s"])
            lines.append(
                f"- **fraction of peak** (target 60%): DALG in float32 ({b['how']}) reaches "
                f"{b['achieved_gflops_per_s']:.1f} GFLOP/s = **{100 * b['achieved_gflops_per_s'] / peak['float32']:.0f}%**"
                f" of the float32 {ex['matmul_n']}² matmul"
                + (
                    f", {100 * b['achieved_gflops_per_s'] / vit['float32']:.0f}% of a GEMM of ViT-S's own shape"
                    if "float32" in vit
                    else ""
                )
                + "."
            )
        for key, s in ((k, ex["summary"][k]) for k in ("plain", "optimised") if k in ex["summary"]):
            lines.append(
                f"- **{key}**: DALG / DOLG-5-scale images/s = **{s['ratio_dalg_over_dolg5']:.2f}×** "
                f"(FLOP ratio {s['flop_ratio_dolg5_over_dalg']:.2f}×; DALG / DOLG-1-scale "
                f"{s['ratio_dalg_over_dolg1']:.2f}×); DALG at "
                f"{100 * (s['dalg_fraction_of_matmul_peak'] or 0):.0f}% of the {s['dalg_dtype']} matmul peak."
            )
        goals = ex["summary"]
        if "bf16" in goals:
            g = goals["bf16"]
            cos = g["one_minus_min_cosine_to_fp32"]
            lines.append(
                f"- **bf16 efficiency** (goal ≥ 40%): DALG in bf16 ({g['dalg']}) "
                f"{g['dalg_achieved_gflops_per_s']:.0f} GFLOP/s = **{100 * g['dalg_fraction_of_bf16_peak']:.0f}%** of "
                f"this run's bf16 matmul peak ({g['bf16_matmul_peak_gflops_per_s']:.0f} GFLOP/s); 1 − cos to fp32 "
                f"{_f(cos, '.1e')} (random weights)."
            )
        fid = results.get("bf16_fidelity")
        if fid:
            maps = {k: next(iter(v.values()), {}) for k, v in fid["mAP"].items()}
            lines.append(
                f"- **bf16 on trained weights** (goal: cosine ≥ {fid['goal_min_cosine']}): min cosine to fp32 "
                f"**{fid['min_cosine']:.6f}** over {sum(s['rows'] for s in fid['stores'].values())} descriptors"
                + (f" of a trained {_model_words(fid['model'])}" if fid.get("model") else "")
                + f" on {fid['data']} at test size {fid['test_size']}; mAP E/M/H fp32 "
                + " / ".join(f"{v:.2f}" for v in maps.get("fp32", {}).values())
                + ", bf16 "
                + " / ".join(f"{v:.2f}" for v in maps.get("bf16", {}).values())
                + f" (*measured {fid['measured_at']} by `{fid['run_command']}`*)."
            )
        if "eager_fp32_single" in goals:
            g = goals["eager_fp32_single"]
            lines.append(
                f"- **eager fp32, one image at a time** (goal ≥ 65%): {g['dalg']} at "
                f"**{100 * g['dalg_fraction_of_fp32_peak']:.0f}%** of the fp32 matmul peak."
            )
        if "per_flop" in goals:
            g = goals["per_flop"]
            lines.append(
                f"- **per-FLOP efficiency** (goal ≥ 1): DALG / DOLG-5 images/s {g['ratio_dalg_over_dolg5']:.2f}× "
                f"against a FLOP ratio of {g['flop_ratio_dolg5_over_dalg']:.2f}× = "
                f"**{g['dalg_efficiency_relative_to_dolg']:.2f}** ({g['dalg']} vs {g['dolg5']})."
            )
        lines.append("")
    tr = results.get("train")
    if tr:
        lines += [
            *_section("Training step (tiny CPU config)", tr),
            f"`{tr.get('command', '')}`",
            "",
            f"`model={tr['model']}`, batch {tr['batch_size']} at {tr['train_size']} px, {tr['num_classes']} "
            f"classes, {tr['optimizer']}: **{tr['images_per_s']:.1f} images/s** (median of {tr['steps']} "
            f"steps); peak RSS of the training process {tr['process_peak_rss_mib']:.0f} MiB (model, optimiser, "
            f"activations; {tr['peak_rss_mib'] - tr['rss_before_mib']:.0f} MiB more than before the timed steps)"
            + (
                f", peak CUDA memory {tr['peak_cuda_allocated_mib']:.0f} MiB"
                if "peak_cuda_allocated_mib" in tr
                else ""
            )
            + ".",
            "",
        ]
    ld = results.get("loader")
    if ld:
        lines += [
            *_section("Training loader (bench_loader.py)", ld),
            f"`{ld['command']}`",
            "",
            "| workers | decoded images/s | augmented images/s | share of a training step waiting for data |",
            "|---:|---:|---:|---:|",
        ]
        for r in ld["results"]:
            share = f"{100 * r['wait_share']:.0f}%" if "wait_share" in r else "–"
            lines.append(
                f"| {r['workers']} | {r['decoded_img_s']:.1f} | {r['augmented_img_s']:.1f} | {share} |"
            )
        lines.append("")
        dec = ld.get("decode")
        if dec:
            names = list(next(iter(dec["sizes"].values()))["images_per_s"])
            lines += [
                f"Realistic JPEGs decoded and augmented to {dec['train_size']} px (random resized crop, area "
                f"{dec['scale'][0]}–{dec['scale'][1]}, flip, jitter, normalise) by one worker, `{dec['command']}`: "
                "images/s (mean |difference| to plain PIL in 8-bit levels).",
                "",
                "| JPEG size | " + " | ".join(names) + " |",
                "|---|" + "---:|" * len(names),
            ]
            for size, r in dec["sizes"].items():
                cells = [
                    f"{r['images_per_s'][n]:.1f} ({r['diff_to_plain_8bit'][n]['mean']:.2f})" for n in names
                ]
                lines.append(f"| {size} | " + " | ".join(cells) + " |")
            lines.append("")
            if "speedup_vs_plain_pil_1600" in dec:
                g = dec["gpu_workers_1600"]
                lines.append(
                    f"- 1600×1200: **{dec['speedup_vs_plain_pil_1600']:.2f}×** plain PIL with "
                    f"{dec['winner_1600']} (goal 2×); crop-first with up to 2× enlargement "
                    f"{dec['speedup_crop_first_upscale2_1600']:.2f}× (not used). One GPU training DALG-S at 512 "
                    f"(~{g['gpu_images_per_s_estimate']:.0f} images/s estimated: {g['gpu_estimate_basis']}) needs "
                    f"**~{g['workers_needed']:.0f} workers** of this CPU with crop-first decoding."
                )
                lines.append("")
    ev = results.get("eval")
    if ev:
        ms = ev["median_ms"]
        lines += [
            *_section("Evaluation from given similarities", ev),
            f"{ev['n_queries']} queries × {ev['n_database']:,} database images, revisited mAP + mP@k (E/M/H); "
            "identical scores checked before timing."
            + (
                f" Each sample repeats a call for ≥ {ev['min_sample_s'] * 1e3:.0f} ms (mean per call, timeit-style), "
                f"{ev['rounds']} interleaved rounds."
                if ev.get("min_sample_s")
                else ""
            ),
            "",
            "| implementation | ms (median) | vs reference |",
            "|---|---:|---:|",
            f"| per-query NumPy reference (benchmarks/bench_eval.py) | {ms['reference']:.1f} | 1× |",
            f"| dalg.retrieval: evaluate_revisited_from_similarity | {ms['dalg']:.1f} | "
            f"**{ms['reference'] / ms['dalg']:.1f}×** |",
        ]
        if "rank_then_score" in ms:
            lines += [
                f"| dalg.retrieval: rank_by_similarity + evaluate_revisited | {ms['rank_then_score']:.1f} | "
                f"{ms['reference'] / ms['rank_then_score']:.1f}× |",
                f"| … of which rank_by_similarity (full ranking) | {ms['rank_only']:.1f} | |",
                f"| … of which evaluate_revisited (given the ranking) | {ms['score_only']:.1f} | "
                f"{ms['reference'] / ms['score_only']:.1f}× |",
            ]
        pm = ev.get("product_median_ms")
        if pm:
            lines += [
                f"| product path: `rank_and_score` (descriptors → similarities → scores + top-100 places, what "
                f"the callback and eval.py run) vs the reference with its own `q @ db.T` ({pm['reference']:.1f} ms) "
                f"| {pm['product']:.1f} | **{ev['speedup_product_path']:.1f}×** |",
            ]
            if "similarities" in pm:
                lines.append(
                    f"| … of which the similarity GEMM (fp32, BLAS): the bound of any product path | "
                    f"{pm['similarities']:.1f} | ≤ {ev['speedup_bound_similarity_gemm']:.1f}× |"
                )
        single = ev.get("single_call_median_ms")
        if single:
            lines.append(
                f"| single calls (cold caches after the reference): reference {single['reference']:.1f} ms, "
                f"evaluate_revisited_from_similarity {single['dalg']:.1f} ms | | "
                f"{single['reference'] / single['dalg']:.1f}× |"
            )
        lines.append("")
    s1 = results.get("search_1m")
    if s1:
        lines += [
            *_section("70 × (5,000 + 1M) search", s1),
            f"`{s1['command']}`: search {_f(s1['search_seconds'])} s, evaluate {_f(s1['evaluate_seconds'], '.3f')}"
            f" s, peak RSS {_f(s1['peak_rss_gib'], '.2f')} GiB (database file generation "
            f"{_f(s1['generation_seconds'])} s, not counted).",
            "",
        ]
        if "gemm_bound_seconds" in s1:
            ex = s1["exactness_vs_fp32"]
            lines += [
                f"- GEMM bound (2·{s1['n_queries']}·{s1['n_database']:,}·{s1['dim']} FLOPs at this run's fp32 "
                f"matmul peak, {s1['fp32_matmul_peak_gflops']:.0f} GFLOP/s): {s1['gemm_bound_seconds']:.2f} s "
                f"→ the search at **{100 * s1['fraction_of_gemm_bound']:.0f}%** of it (goal: search ≤ 1.0 s, "
                "peak RSS ≤ 1.5 GiB)"
                + (
                    f"; the previous route (FAISS IndexFlatIP per 65k chunk) took {s1['faiss_route_seconds']:.2f} s "
                    f"in the same run ({s1['faiss_route_seconds'] / s1['search_seconds']:.1f}× slower)."
                    if s1.get("faiss_route_seconds")
                    else "."
                ),
                f"- against a plain fp32 ranking (NumPy product, stable sort) for {ex['places'] // s1['k']} "
                f"queries: {ex['differing_places']} of {ex['places']} places differ, largest score gap there "
                f"{ex['max_gap']:.1e} (tolerance 1e-6: fp32 rounding of near-ties).",
                "",
            ]
    sc = results.get("scaling")
    if sc:
        lines += [
            *_section("Scaling curves (bench_scaling.py)", sc),
            "![scaling curves](scaling.png)",
            "",
            "| model @ scales | side px | ms / image | GFLOPs / image |",
            "|---|---:|---:|---:|",
        ]
        for r in sc["extraction"]:
            lines.append(
                f"| {r['model']}@{len(r['scales'])} | {r['side']} | {r['seconds'] * 1e3:.0f} | {r['gflops']:.1f} |"
            )
        lines += [
            "",
            "| database rows (top-1000, 70 queries) | search s | peak RSS GiB |",
            "|---:|---:|---:|",
        ]
        for r in sc["search"]:
            lines.append(f"| {r['n_database']:,} | {r['seconds']:.3f} | {r['peak_rss_gib']:.2f} |")
        lines += ["", "| queries × database (full ranking) | ms |", "|---|---:|"]
        for r in sc["evaluation"]:
            lines.append(f"| {r['n_queries']} × {r['n_database']:,} | {r['seconds'] * 1e3:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny configs and sizes: a smoke run in seconds")
    ap.add_argument("--skip-1m", action="store_true", help="skip the 1M-distractor search")
    ap.add_argument(
        "--table-only", action="store_true", help="only rebuild results.md from the JSONs in --out"
    )
    ap.add_argument("--skip-loader", action="store_true", help="skip the training-loader benchmark")
    ap.add_argument(
        "--sections",
        default=",".join(DEFAULT_SECTIONS),
        help=f"comma list of {SECTIONS} (default: all but scaling)",
    )
    ap.add_argument("--out", type=Path, default=REPO / "experiments" / "bench")
    ap.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--image-dir", default=str(DEFAULT_IMAGES), help="photos read at run time (never copied)")
    ap.add_argument("--synthetic-images", action="store_true", help="use synthetic generator views instead")
    ap.add_argument(
        "--images", type=int, default=None, help="images per extraction round (default 8; quick 2)"
    )
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; quick 1)")
    ap.add_argument("--size", type=int, default=None, help="test size, longer side (default 512; quick 64)")
    ap.add_argument("--max-batch", type=int, default=8, help="batch size of the by-shape batching variant")
    ap.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time torch.compile variants at one scale (default: on, off with --quick; ~6 min of "
        "compiling on 2 CPU cores)",
    )
    ap.add_argument(
        "--matmul-n", type=int, default=None, help="matmul side for the peak (default 2048; quick 256)"
    )
    ap.add_argument("--n-distractors", type=int, default=1_000_000)
    args = ap.parse_args(argv)
    args.images = args.images or (2 if args.quick else 8)
    args.compile = (not args.quick) if args.compile is None else args.compile
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.size = args.size or (64 if args.quick else 512)
    args.matmul_n = args.matmul_n or (256 if args.quick else 2048)
    sections = [] if args.table_only else [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; known: {SECTIONS}")
    if args.skip_1m and "search_1m" in sections:
        sections.remove("search_1m")
    if args.skip_loader and "loader" in sections:
        sections.remove("loader")
    sections.sort(key=RUN_ORDER.index)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )

    command = "python benchmarks/run_all.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    t0 = time.perf_counter()
    env = {
        "machine": machine_facts(device),
        "load_start": load_average(),
        "started": started,
        "command": command.strip(),
        "quick": args.quick,
    }
    results: dict[str, Any] = {}
    runners = {
        "extraction": lambda: run_extraction(args, device),
        "train": lambda: run_train(args, device),
        "eval": lambda: bench_eval.run(
            rounds=1 if args.quick else 25,
            min_sample_s=0.0 if args.quick else 0.05,
            log=lambda s: print(s, flush=True),
        ),
        "loader": lambda: run_loader(args),
        "search_1m": lambda: run_search_1m(args),
        "scaling": lambda: run_scaling(args),
    }
    for name in sections:
        load_start = load_average()
        print(f"[{name}] load average {load_start}", flush=True)
        t_section = time.perf_counter()
        res = runners[name]()
        res.update(
            load_start=load_start,
            load_end=load_average(),
            seconds=time.perf_counter() - t_section,
            measured_at=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            run_command=command.strip(),
            machine=env["machine"],
        )
        write_json(args.out / f"{name}.json", res)
    env.update(load_end=load_average(), seconds=time.perf_counter() - t0, sections=sections)
    if sections:  # --table-only leaves the record of the last measuring run alone
        write_json(args.out / "environment.json", env)
    # the table covers every section present in the folder (a section re-run alone replaces only its own JSON)
    for name in SECTIONS:
        path = args.out / f"{name}.json"
        if path.is_file():
            results[name] = json.loads(path.read_text())
    # not a section (it needs a trained checkpoint): benchmarks/bench_bf16_fidelity.py writes it when run by hand
    fidelity = args.out / "bf16_fidelity.json"
    if fidelity.is_file():
        results["bf16_fidelity"] = json.loads(fidelity.read_text())
    results["environment"] = env
    table = markdown(results, command.strip())
    md = args.out / "results.md"
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text(table + "\n")
    os.replace(tmp, md)
    print(table)
    print(f"wrote {args.out}/{{{','.join(sections + ['environment'])}}}.json and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
