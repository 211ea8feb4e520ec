"""Collect fusion x backbone multiruns into a markdown table, a JSON file and a bar chart of mAP_M / mAP_H.

    python experiments/ablation/collect.py <sweep dir> [<sweep dir> ...] [--out DIR] [--value last|best]

Each job folder of a sweep holds ``config.yaml`` (resolved), ``metrics.json`` (best and last validation) and
``run_meta.json`` (git commit, data fingerprint), all written by ``src/train.py``; jobs are found at any depth and
read by the sweep summary (:mod:`dalg.sweeps.summary`, which also reads folders written before ``metrics.json``
held the best validation). Fusion names come from ``conf/model/fusion/*.yaml`` (:func:`dalg.factory.fusion_names`),
evaluation sets from the metrics. Several sweeps (e.g. one per seed) are merged when they share the budget and
data; a cell run with several seeds shows mean ± standard deviation. The table holds the last validation (every
cell after the same number of steps) unless ``--value best``. ``--out`` defaults to the first sweep folder.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from dalg.factory import fusion_name_by_class, fusion_names
from dalg.sweeps.summary import eval_sets, load_jobs

REPO = Path(__file__).resolve().parents[2]
FUSIONS = fusion_names()  # conf/model/fusion/*.yaml
SETS: dict[str, str] = {}  # evaluation sets of the runs being collected (name -> label), set by load_runs


def fusion_name(target: str) -> str:
    cls = target.rsplit(".", 1)[-1]
    return fusion_name_by_class().get(cls, cls)


def backbone_label(bb: dict[str, Any]) -> str:
    family = (
        "deit"
        if "deit" in str(bb.get("name", ""))
        else ("vit" if "vit" in str(bb.get("name", "")) else bb.get("name"))
    )
    return f"{family}{bb.get('depth', '?')}x{bb.get('embed_dim', '?')}"


def load_runs(sweep_dirs: Path | list[Path], value: str = "last") -> list[dict[str, Any]]:
    """One row per finished job under the sweep folders (any depth); ``value``: the ``last`` or ``best``
    validation's metrics."""
    if value not in ("last", "best"):
        raise SystemExit(f"--value must be last or best, got {value!r}")
    sweep_dirs = [sweep_dirs] if isinstance(sweep_dirs, Path) else list(sweep_dirs)
    for d in sweep_dirs:
        if not d.is_dir():
            raise SystemExit(f"sweep folder {d} does not exist")
    jobs = [j for j in load_jobs(sweep_dirs) if "model" in j.config and "seed" in j.config]
    if not jobs:
        raise SystemExit(f"no finished runs under {', '.join(map(str, sweep_dirs))}")
    SETS.clear()
    SETS.update({s: s for s in eval_sets(jobs)})
    runs = []
    for job in jobs:
        cfg, meta = job.config, job.meta
        values = job.best if value == "best" else job.last
        row = {
            "job": job.job,
            "fusion": fusion_name(cfg["model"]["fusion"]["_target_"]),
            "backbone": backbone_label(cfg["model"]["backbone"]),
            "seed": cfg["seed"],
            "epochs": cfg.get("trainer", {}).get("max_epochs"),
            "global_step": job.global_step,
            "elapsed_s": job.elapsed_s,
            "git": meta.get("git", {}).get("commit"),
            "data_sha256": meta.get("data", {}).get("sha256"),
            "value": value,
        }
        for s in SETS:
            for k in ("mAP_M", "mAP_H"):
                row[f"{s}/{k}"] = values.get(f"val/{s}/{k}")
        runs.append(row)
    _check_comparable(runs)
    return runs


def _check_comparable(runs: list[dict[str, Any]]) -> None:
    """Merged sweeps must differ only in seed: same budget and data, and no (fusion, backbone, seed) twice."""
    for key in ("epochs", "global_step", "data_sha256"):
        values = {r[key] for r in runs if r[key] is not None}
        if len(values) > 1:
            raise SystemExit(
                f"runs differ in {key} ({sorted(values, key=str)}): not one ablation, not merged"
            )
    seen: dict[tuple, str] = {}
    for r in runs:
        cell = (r["fusion"], r["backbone"], r["seed"])
        if cell in seen:
            raise SystemExit(f"{r['job']} repeats {seen[cell]} (fusion {cell[0]}, {cell[1]}, seed {cell[2]})")
        seen[cell] = r["job"]


def cells(runs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(fusion, backbone) -> {metric: (mean, sample std or None, n)} over the seeds run for that cell."""
    import statistics

    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        grouped.setdefault((r["fusion"], r["backbone"]), []).append(r)
    out = {}
    for key, rs in grouped.items():
        stats = {}
        for s in SETS:
            for k in ("M", "H"):
                vals = [r[f"{s}/mAP_{k}"] for r in rs if r[f"{s}/mAP_{k}"] is not None]
                stats[f"{s}/mAP_{k}"] = (
                    statistics.fmean(vals) if vals else None,
                    statistics.stdev(vals) if len(vals) > 1 else None,
                    len(vals),
                )
        out[key] = stats
    return out


def _fmt(stat: tuple[float | None, float | None, int] | None) -> str:
    if stat is None or stat[0] is None:
        return "-"
    mean, std, _ = stat
    return f"{mean:.2f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def markdown_table(runs: list[dict[str, Any]]) -> str:
    backbones = sorted({r["backbone"] for r in runs}, reverse=True)
    by = cells(runs)
    head = ["fusion"] + [f"{b} {SETS[s]} {k}" for b in backbones for s in SETS for k in ("M", "H")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fusions = [f for f in FUSIONS if any(r["fusion"] == f for r in runs)]
    fusions += sorted({r["fusion"] for r in runs} - set(fusions))
    for f in fusions:
        row = [f]
        for b in backbones:
            stats = by.get((f, b), {})
            row += [_fmt(stats.get(f"{s}/mAP_{k}")) for s in SETS for k in ("M", "H")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def seed_spread(runs: list[dict[str, Any]]) -> str | None:
    """One line on how much the seed alone moves a cell (median std over the cells run with > 1 seed)."""
    import statistics

    parts = []
    for s, label in SETS.items():
        for k in ("M", "H"):
            stds = [c[f"{s}/mAP_{k}"][1] for c in cells(runs).values() if c[f"{s}/mAP_{k}"][1] is not None]
            if stds:
                parts.append(f"{label} mAP_{k} {statistics.median(stds):.1f} (max {max(stds):.1f})")
    return (
        ("- seed-to-seed standard deviation of one cell, median over cells: " + "; ".join(parts))
        if parts
        else None
    )


def bar_chart(runs: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    backbones = sorted({r["backbone"] for r in runs}, reverse=True)
    fusions = [f for f in FUSIONS if any(r["fusion"] == f for r in runs)]
    by = cells(runs)
    fig, axes = plt.subplots(1, len(SETS), figsize=(7 * len(SETS), 4.6), sharey=False)
    series = [(b, k) for b in backbones for k in ("M", "H")]
    width = 0.8 / len(series)
    x = np.arange(len(fusions))
    colors = plt.get_cmap("tab20")
    for ax, (s, title) in zip(np.atleast_1d(axes), SETS.items()):
        for i, (b, k) in enumerate(series):
            stats = [by.get((f, b), {}).get(f"{s}/mAP_{k}") or (None, None, 0) for f in fusions]
            means = [m if m is not None else 0 for m, _, _ in stats]
            errs = [sd if sd is not None else 0 for _, sd, _ in stats]
            ax.bar(
                x + (i - (len(series) - 1) / 2) * width,
                means,
                width,
                yerr=errs if any(errs) else None,
                capsize=2,
                label=f"{b} mAP_{k}",
                color=colors(2 * backbones.index(b) + (k == "H")),
            )
        ax.set_xticks(x, fusions, rotation=20)
        ax.set_ylabel("revisited mAP (%)")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = np.atleast_1d(axes)[0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="lower center", ncol=len(series), fontsize=8, frameon=False
    )  # below, not on bars
    seeds = sorted({r["seed"] for r in runs})
    fig.suptitle(
        f"Fusion ablation (CPU budget, same data/steps per cell; seeds {seeds}"
        + (", mean ± std)" if len(seeds) > 1 else ")")
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


def collect(
    sweep_dirs: Path | list[Path],
    out_dir: Path,
    command: str | None = None,
    wall_s: float | None = None,
    value: str = "last",
) -> dict[str, Path]:
    runs = load_runs(sweep_dirs, value)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = bar_chart(runs, out_dir / "results.png")
    (out_dir / "results.json").write_text(json.dumps(runs, indent=1))
    r0 = runs[0]
    seeds = sorted({r["seed"] for r in runs})
    n_cells = len({(r["fusion"], r["backbone"]) for r in runs})
    lines = ["# Fusion x backbone ablation (`make ablate`)", ""]
    if command:
        lines += ["Command:", "", "```", command, "```", ""]
    lines += [
        f"- runs: {len(runs)} ({n_cells} fusion x backbone cells, seed{'s' if len(seeds) > 1 else ''} "
        f"{', '.join(map(str, seeds))}), {r0['global_step']} optimiser steps of 64 images each, from scratch, "
        f"embedded synthetic data (sha256 {str(r0['data_sha256'])[:12]}), "
        f"git {', '.join(sorted({str(r['git'])[:10] for r in runs}))}",
        f"- metrics: revisited mAP (%) at the {value} validation, Medium (M) and Hard (H) setups; sets: "
        f"{', '.join(SETS)} (synthetic_heldout = classes never trained on; landmarks_mini = real photos, tiny "
        "and noisy: a few queries, from-scratch CPU models)"
        + ("; mean ± sample standard deviation over the seeds" if len(seeds) > 1 else ""),
        "- per-run time: "
        + ", ".join(
            f"{r['fusion']}/{r['backbone']}/s{r['seed']} {r['elapsed_s']:.0f}s"
            for r in runs
            if r["elapsed_s"]
        ),
    ]
    sweeps: dict[str, set] = {}
    for r in runs:
        sweeps.setdefault(r["job"].split("/", 1)[0], set()).add(r["seed"])
    if len(sweeps) > 1:
        lines.append(
            "- sweeps merged (folder under logs/ablation/multiruns: seeds): "
            + "; ".join(f"{name}: {', '.join(map(str, sorted(seeds)))}" for name, seeds in sweeps.items())
        )
    if wall_s is not None:
        load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
        lines.append(
            f"- whole sweep wall time: {wall_s / 60:.1f} min on {os.cpu_count()} CPU cores "
            f"(load average 1/5/15 min when the table was written: {load})"
        )
    spread = seed_spread(runs)
    if spread:
        lines.append(spread)
        lines.append(
            "- reading: a short from-scratch budget on CPU. Differences between fusions smaller than about "
            "twice the seed-to-seed deviation above are noise; even larger ones say nothing about DALG's "
            "claims, which need the GLDv2 recipe (experiment=dalg_gldv2)."
        )
    else:
        lines.append(
            "- reading: one seed and a short from-scratch budget on CPU. The table shows that every variant "
            "trains and is evaluated the same way; gaps of a few points between variants are within what a "
            'different seed would change (run seeds with `make ablate ARGS="seed=1,2 --merge <sweep>"`), '
            "so it is not evidence for or against DALG's claims, which need the GLDv2 recipe "
            "(experiment=dalg_gldv2)."
        )
    lines += ["", markdown_table(runs), "", f"![mAP per fusion]({png.name})", ""]
    md = out_dir / "results.md"
    md.write_text("\n".join(lines))
    print(markdown_table(runs))
    print(f"[collect] wrote {md}, {png}, {out_dir / 'results.json'}")
    return {"table": md, "plot": png, "json": out_dir / "results.json"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dirs", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, default=None, help="default: the first sweep folder")
    ap.add_argument("--value", choices=("last", "best"), default="last", help="which validation's metrics")
    args = ap.parse_args()
    collect(args.sweep_dirs, args.out or args.sweep_dirs[0], value=args.value)


if __name__ == "__main__":
    main()
