"""The summary of a sweep: one row per job, its varying overrides, best and last validation metrics per set.

    python -m dalg.sweeps.summary <sweep dir> [<sweep dir> ...] [--out DIR] [--metrics mAP_M,mAP_H]
    make sweep-summary DIR=logs/train/multiruns/<run_name>

Written after every ``-m`` sweep by :class:`dalg.sweeps.hydra_callback.SweepSummaryCallback` as
``summary.{md,csv,json,png}`` in the sweep folder, and printed.

A job is any folder under the sweep folder (nested folders included) holding ``config.yaml`` and ``metrics.json``
as ``src/train.py`` writes them. "best" is the validation with the highest ``optimized_metric`` (the one the best
checkpoint holds; ``metrics.json`` -> ``best``), "last" the final validation. Jobs written before metrics.json held
a ``best`` entry get it from their ``csv/metrics.csv`` (the validation rows logged during training).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dalg.sweeps.job_names import EXCLUDED_KEYS

log = logging.getLogger(__name__)

METRICS = ("mAP_M", "mAP_H")
_SET_METRIC = re.compile(r"^val/([^/]+)/(mAP_[EMH]|mP@\d+_[EMH])$")


@dataclass
class JobResult:
    job: str  # folder relative to the summarised folder
    path: Path
    overrides: dict[str, str]
    config: dict[str, Any]
    monitor: str | None
    best: dict[str, float]  # val/<set>/<metric> at the best validation (empty: unknown)
    last: dict[str, float]  # at the last validation
    best_step: int | None = None
    global_step: int | None = None
    elapsed_s: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _natural(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_jobs(root: Path) -> list[Path]:
    """Job folders under ``root`` (itself included), at any depth, in natural order (2 before 10)."""
    found = [p.parent for p in root.rglob("config.yaml") if ".hydra" not in p.parent.parts]
    if (root / "config.yaml").is_file() and root not in found:
        found.append(root)
    return sorted(set(found), key=_natural)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable as JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _overrides(job: Path) -> dict[str, str]:
    from dalg.sweeps.job_names import job_overrides

    path = job / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    items = yaml.safe_load(path.read_text()) or []
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a list of overrides")
    return job_overrides(items)


def _val_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if _SET_METRIC.match(k) and v is not None}


def best_from_csv(csv_path: Path, monitor: str) -> tuple[dict[str, float], int | None]:
    """The validation row of a Lightning ``metrics.csv`` with the highest ``monitor`` (validations during
    training only: the untrained model's row at step 0 is left out, as ModelCheckpoint never saw it)."""
    best: dict[str, float] = {}
    best_step, best_value = None, -math.inf
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            value, step = row.get(monitor), row.get("step")
            if not value or not step or int(float(step)) == 0:
                continue
            if float(value) > best_value:  # strictly greater: the first best wins, as in ModelCheckpoint
                best_value, best_step = float(value), int(float(step))
                best = _val_metrics({k: v for k, v in row.items() if v not in ("", None)})
    return best, best_step


def read_job(job: Path, root: Path) -> JobResult | None:
    """One job's results; None (with a warning) for an unfinished job without ``metrics.json``."""
    metrics_file = job / "metrics.json"
    if not metrics_file.is_file():
        log.warning("%s: no metrics.json (unfinished?) - left out of the summary", job)
        return None
    final = _read_json(metrics_file)
    config = yaml.safe_load((job / "config.yaml").read_text()) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{job / 'config.yaml'}: expected a mapping")
    monitor = final.get("monitor") or config.get("optimized_metric")
    last_entry = final.get("last") or {}
    last = _val_metrics(last_entry.get("metrics") or final.get("metrics") or {})
    best_entry = final.get("best") or {}
    best, best_step = _val_metrics(best_entry.get("metrics") or {}), best_entry.get("step")
    if not best and monitor and (job / "csv" / "metrics.csv").is_file():  # written before "best" existed
        best, best_step = best_from_csv(job / "csv" / "metrics.csv", monitor)
    meta = _read_json(job / "run_meta.json") if (job / "run_meta.json").is_file() else {}
    return JobResult(
        job=root.name if job == root else f"{root.name}/{job.relative_to(root).as_posix()}",
        path=job,
        overrides=_overrides(job),
        config=config,
        monitor=monitor,
        best=best,
        last=last,
        best_step=best_step,
        global_step=final.get("global_step"),
        elapsed_s=final.get("elapsed_s"),
        meta=meta,
    )


def load_jobs(roots: Path | Sequence[Path]) -> list[JobResult]:
    roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
    jobs: list[JobResult] = []
    for root in map(Path, roots):
        if not root.is_dir():
            raise FileNotFoundError(f"sweep folder {root} does not exist")
        jobs += [j for j in (read_job(p, root) for p in find_jobs(root)) if j is not None]
    return jobs


def varying_keys(jobs: Sequence[JobResult]) -> list[str]:
    """Override keys whose value differs between jobs (a key missing from a job counts as a value)."""
    keys: list[str] = []
    for j in jobs:
        keys += [k for k in j.overrides if k not in keys and k not in EXCLUDED_KEYS]
    return [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]


def eval_sets(jobs: Sequence[JobResult]) -> list[str]:
    names: list[str] = []
    for j in jobs:
        for k in (*j.last, *j.best):
            name = _SET_METRIC.match(k).group(1)
            if name not in names:
                names.append(name)
    return names


def rows(jobs: Sequence[JobResult], metrics: Sequence[str] = METRICS) -> list[dict[str, Any]]:
    """Flat rows (CSV/JSON): job, varying overrides, steps, then ``<set>/<metric>/best`` and ``.../last``."""
    keys, sets = varying_keys(jobs), eval_sets(jobs)
    out = []
    for j in jobs:
        row: dict[str, Any] = {"job": j.job, **{k: j.overrides.get(k) for k in keys}}
        row.update(best_step=j.best_step, global_step=j.global_step, elapsed_s=j.elapsed_s)
        for s in sets:
            for m in metrics:
                row[f"{s}/{m}/best"] = j.best.get(f"val/{s}/{m}")
                row[f"{s}/{m}/last"] = j.last.get(f"val/{s}/{m}")
        out.append(row)
    return out


def _cell(best: float | None, last: float | None) -> str:
    if best is None and last is None:
        return "-"
    b = "-" if best is None else f"{best:.2f}"
    return b if last is None or last == best else f"{b} / {last:.2f}"


def markdown(jobs: Sequence[JobResult], metrics: Sequence[str] = METRICS) -> str:
    """One line per job; cells are ``best / last`` (one value when they are equal)."""
    keys, sets = varying_keys(jobs), eval_sets(jobs)
    head = ["job", *keys, "best step / steps", *[f"{s} {m}" for s in sets for m in metrics]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for j, row in zip(jobs, rows(jobs, metrics)):
        cells = [j.path.name, *[str(row[k]) if row[k] is not None else "-" for k in keys]]
        cells.append(f"{j.best_step if j.best_step is not None else '-'} / {j.global_step or '-'}")
        cells += [_cell(row[f"{s}/{m}/best"], row[f"{s}/{m}/last"]) for s in sets for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(jobs: Sequence[JobResult], out: Path, metric: str = "mAP_M") -> Path:
    """One panel per evaluation set: best (solid) and last (light) ``metric`` per job."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sets = eval_sets(jobs) or ["(none)"]
    labels = [j.path.name for j in jobs]
    fig, axes = plt.subplots(1, len(sets), figsize=(max(5.0, 0.9 * len(jobs) + 2) * len(sets), 4.2))
    x = np.arange(len(jobs))
    for ax, s in zip(np.atleast_1d(axes), sets):
        best = [j.best.get(f"val/{s}/{metric}", np.nan) for j in jobs]
        last = [j.last.get(f"val/{s}/{metric}", np.nan) for j in jobs]
        ax.bar(x - 0.2, best, 0.4, label="best", color="tab:blue")
        ax.bar(x + 0.2, last, 0.4, label="last", color="tab:blue", alpha=0.4)
        ax.set_xticks(x, labels, rotation=25, ha="right", fontsize=8)
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(s)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out


def _write(path: Path, text: str) -> Path:
    from dalg.utils.atomic import write_text_atomic

    return write_text_atomic(text, path)


def write_summary(
    roots: Path | Sequence[Path], out_dir: Path | None = None, metrics: Sequence[str] = METRICS
) -> dict[str, Path] | None:
    """``summary.{md,csv,json,png}`` in ``out_dir`` (default: the first folder); prints the table. None when no
    job has finished (nothing written)."""
    roots = [Path(roots)] if isinstance(roots, (str, Path)) else [Path(r) for r in roots]
    jobs = load_jobs(roots)
    if not jobs:
        print(f"[sweep summary] no finished job under {', '.join(map(str, roots))}")
        return None
    out_dir = Path(out_dir or roots[0])
    table = markdown(jobs, metrics)
    monitors = sorted({j.monitor for j in jobs if j.monitor})
    md = [
        f"# Sweep summary: {', '.join(str(r) for r in roots)}",
        "",
        f"- {len(jobs)} job(s); varying: {', '.join(varying_keys(jobs)) or '(nothing: one configuration)'}",
        f"- cells: best / last validation (one value when equal); best = the validation with the highest "
        f"{', '.join(monitors) or 'optimized_metric'} (the best checkpoint), revisited mAP in %",
        "",
        table,
        "",
        "![best and last mAP per job](summary.png)",
        "",
    ]
    flat = rows(jobs, metrics)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(flat[0]))
    writer.writeheader()
    writer.writerows(flat)
    made = {
        "md": _write(out_dir / "summary.md", "\n".join(md)),
        "csv": _write(out_dir / "summary.csv", buf.getvalue()),
        "json": _write(
            out_dir / "summary.json",
            json.dumps(
                {"varying": varying_keys(jobs), "monitor": monitors, "metrics": list(metrics), "jobs": flat},
                indent=1,
            ),
        ),
        "png": plot(jobs, out_dir / "summary.png", metrics[0]),
    }
    print(
        f"\nsweep summary ({len(jobs)} jobs; cells best / last)\n{table}\n[sweep summary] wrote {made['md']}"
    )
    return made


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dirs", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, default=None, help="where summary.* go (default: the first folder)")
    ap.add_argument("--metrics", default=",".join(METRICS), help="comma-separated, e.g. mAP_E,mAP_M,mAP_H")
    args = ap.parse_args(argv)
    for d in args.sweep_dirs:
        if not d.is_dir():
            ap.error(f"sweep folder {d} does not exist")
    made = write_summary(args.sweep_dirs, args.out, [m for m in args.metrics.split(",") if m])
    return 0 if made else 1


if __name__ == "__main__":
    raise SystemExit(main())
