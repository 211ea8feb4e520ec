"""Global pooling of ViT tokens compared at the ablation's budget (experiment=ablation_cpu: dalg_tiny with the
cross-attention fusion, 3 epochs from scratch on the embedded synthetic data, one evaluation at the end), one
Hydra multirun over poolings x seeds, then a mean ± std table.

    python experiments/pooling/run.py [--name NAME] [--poolings gem,gem_proj,mean] [--seeds 42,1]
                                      [--collect-only] [hydra overrides ...]

The sweep folder is logs/pooling/multiruns/<NAME>; running the same command again resumes unfinished cells
(resume=auto). Outputs: experiments/pooling/results.{md,json} and command.txt.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
SETS = {"synthetic_heldout": "synthetic held-out", "landmarks_mini": "landmarks-mini"}
METRICS = [f"{s}/{k}" for s in SETS for k in ("mAP_M", "mAP_H")]


def sweep_command(
    name: str, poolings: list[str], seeds: list[str], log_dir: Path, extra: list[str]
) -> list[str]:
    return [
        sys.executable,
        str(REPO / "src" / "train.py"),
        "-m",
        "experiment=ablation_cpu",
        "task_name=pooling",
        f"model/global_branch={','.join(poolings)}",
        f"seed={','.join(seeds)}",
        f"run_name={name}",
        f"paths.log_dir={log_dir}",
        "hydra.sweep.subdir=${hydra:job.num}",
        *extra,
    ]


def load_runs(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per finished job: pooling, seed, budget, data fingerprint, git commit, the four mAPs (%)."""
    if not sweep_dir.is_dir():
        raise SystemExit(f"sweep folder {sweep_dir} does not exist")
    runs = []
    for job in sorted(
        (p for p in sweep_dir.iterdir() if (p / "config.yaml").is_file()), key=lambda p: p.name
    ):
        if not (job / "metrics.json").is_file():
            print(f"[pooling] {job}: no metrics.json (unfinished?) - left out", file=sys.stderr)
            continue
        cfg = yaml.safe_load((job / "config.yaml").read_text())
        final = json.loads((job / "metrics.json").read_text())
        meta = json.loads((job / "run_meta.json").read_text()) if (job / "run_meta.json").is_file() else {}
        row = {
            "job": job.name,
            "pooling": cfg["model"]["global_branch"].get("pooling", "gem"),
            "seed": cfg["seed"],
            "fusion": cfg["model"]["fusion"]["_target_"].rsplit(".", 1)[-1],
            "epochs": cfg["trainer"]["max_epochs"],
            "global_step": final.get("global_step"),
            "elapsed_s": final.get("elapsed_s"),
            "git": meta.get("git", {}).get("commit"),
            "git_dirty": meta.get("git", {}).get("dirty"),
            "data_sha256": meta.get("data", {}).get("sha256"),
        }
        for m in METRICS:
            row[m] = final["metrics"].get(f"val/{m}")
        runs.append(row)
    if not runs:
        raise SystemExit(f"no finished runs under {sweep_dir}")
    for key in ("epochs", "global_step", "data_sha256", "fusion"):
        if len({r[key] for r in runs}) > 1:
            raise SystemExit(f"runs differ in {key}: not one comparison")
    cells = [(r["pooling"], r["seed"]) for r in runs]
    if len(set(cells)) != len(cells):
        raise SystemExit(f"a (pooling, seed) cell ran twice: {sorted(cells)}")
    return runs


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per pooling: seeds, and per metric the values (seed order), mean and sample standard deviation."""
    out: dict[str, dict[str, Any]] = {}
    for pooling in dict.fromkeys(r["pooling"] for r in runs):
        rows = sorted((r for r in runs if r["pooling"] == pooling), key=lambda r: r["seed"])
        cell: dict[str, Any] = {"seeds": [r["seed"] for r in rows]}
        for m in METRICS:
            vals = [r[m] for r in rows if r[m] is not None]
            cell[m] = {
                "values": vals,
                "mean": statistics.fmean(vals) if vals else None,
                "std": statistics.stdev(vals) if len(vals) > 1 else None,
            }
        out[pooling] = cell
    return out


def _fmt(stat: dict[str, Any]) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean']:.1f}" + (f" ± {stat['std']:.1f}" if stat["std"] is not None else "")


def write_results(
    out: Path,
    runs: list[dict[str, Any]],
    summary: dict[str, dict[str, Any]],
    command: str,
    wall_s: float | None,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps({"command": command, "wall_s": wall_s, "summary": summary, "runs": runs}, indent=2) + "\n"
    )
    r0 = runs[0]
    head = "| pooling | seeds | " + " | ".join(f"{SETS[m.split('/')[0]]} {m.split('_')[-1]}" for m in METRICS)
    lines = [
        "# Global pooling of ViT tokens (`experiments/pooling/run.py`)",
        "",
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
        f"- runs: {len(runs)}; {r0['global_step']} optimiser steps ({r0['epochs']} epochs) each, from scratch, "
        f"dalg_tiny ({r0['fusion']}), embedded synthetic data (sha256 {str(r0['data_sha256'])[:12]}), "
        f"git {', '.join(sorted({str(r['git'])[:10] + (' (dirty)' if r['git_dirty'] else '') for r in runs}))}",
        "- metrics: revisited mAP (%), Medium (M) and Hard (H); mean ± sample standard deviation over the seeds",
        "- per-run time: "
        + ", ".join(
            f"{r['pooling']}/s{r['seed']} {r['elapsed_s']:.0f}s" for r in runs if r["elapsed_s"] is not None
        ),
        "",
        head + " |",
        "|" + "---|" * (2 + len(METRICS)),
    ]
    for pooling, cell in summary.items():
        lines.append(
            f"| {pooling} | {', '.join(map(str, cell['seeds']))} | "
            + " | ".join(_fmt(cell[m]) for m in METRICS)
            + " |"
        )
    lines += [
        "",
        "Per seed:",
        "",
        "| pooling | seed | " + " | ".join(METRICS) + " |",
        "|" + "---|" * (2 + len(METRICS)),
    ]
    for r in sorted(runs, key=lambda r: (r["pooling"], r["seed"])):
        lines.append(
            f"| {r['pooling']} | {r['seed']} | "
            + " | ".join("-" if r[m] is None else f"{r[m]:.1f}" for m in METRICS)
            + " |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="pooling", help="sweep folder name under logs/pooling/multiruns/")
    ap.add_argument("--log-dir", type=Path, default=REPO / "logs")
    ap.add_argument("--out", type=Path, default=REPO / "experiments" / "pooling")
    ap.add_argument(
        "--poolings", default="gem,gem_proj,mean", help="comma-separated conf/model/global_branch names"
    )
    ap.add_argument("--seeds", default="42,1")
    ap.add_argument("--collect-only", action="store_true")
    args, overrides = ap.parse_known_args()
    sweep_dir = args.log_dir / "pooling" / "multiruns" / args.name
    cmd = sweep_command(args.name, args.poolings.split(","), args.seeds.split(","), args.log_dir, overrides)
    shown = "python " + " ".join(shlex.quote(c) for c in [str(Path(cmd[1]).relative_to(REPO)), *cmd[2:]])
    shown = shown.replace(str(REPO) + "/", "")
    wall = None
    if not args.collect_only:
        print(f"[pooling] {shown}\n[pooling] sweep folder: {sweep_dir}", flush=True)
        t0 = time.time()
        subprocess.run(cmd, cwd=REPO, check=True)
        wall = time.time() - t0
    runs = load_runs(sweep_dir)
    write_results(args.out, runs, summarise(runs), shown, wall)
    print(f"[pooling] table {args.out / 'results.md'}")
    if not args.collect_only:
        user = "python experiments/pooling/run.py" + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "")
        (args.out / "command.txt").write_text(f"{user}\n# = {shown}\n# wall time {wall:.0f} s\n")


if __name__ == "__main__":
    main()
