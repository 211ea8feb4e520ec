"""`make ablate`: a Hydra multirun over the six fusions x two CPU-sized ViT backbones on the embedded synthetic data
(experiment=ablation_cpu: same seed, data and budget for every cell), then the table and bar chart.

    python experiments/ablation/run.py [--name NAME] [--merge NAME,...] [--collect-only] [hydra overrides ...]
    python experiments/ablation/run.py --name seeds12 --merge ablation seed=1,2    # two more seeds, one table

The sweep folder is logs/ablation/multiruns/<NAME> (default: ablation), so running the same command again after an
interruption resumes every unfinished cell from its last.ckpt (resume=auto) and re-evaluates finished ones.
``--merge`` adds the finished runs of other sweeps with the same budget and data (e.g. other seeds) to the table:
cells with several seeds show mean ± std. Outputs: results.{md,png,json} and command.txt in the sweep folder, or
in ``--out`` (the committed table: ``--out experiments/ablation``, only for a run at the ablation's full budget).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from collect import FUSIONS, collect  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BACKBONES = ["vit6x128", "deit4x160"]  # conf/experiment/ablation_backbone/*.yaml


def sweep_command(
    name: str, extra: list[str], log_dir: Path, fusions: list[str], backbones: list[str]
) -> list[str]:
    return [
        sys.executable,
        str(REPO / "src" / "train.py"),
        "-m",
        "experiment=ablation_cpu",
        f"model/fusion={','.join(fusions)}",
        f"+experiment/ablation_backbone={','.join(backbones)}",
        f"run_name={name}",
        f"paths.log_dir={log_dir}",
        *extra,
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="ablation", help="sweep folder name under logs/ablation/multiruns/")
    ap.add_argument("--log-dir", type=Path, default=REPO / "logs")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="table folder (default: the sweep folder; never the committed one)",
    )
    ap.add_argument("--collect-only", action="store_true")
    ap.add_argument(
        "--merge", default="", help="comma-separated names of other sweeps to put in the same table"
    )
    ap.add_argument("--fusions", default=",".join(FUSIONS), help="comma-separated subset (default: all six)")
    ap.add_argument("--backbones", default=",".join(BACKBONES), help="comma-separated subset")
    args, overrides = ap.parse_known_args()
    sweep_dir = args.log_dir / "ablation" / "multiruns" / args.name
    out = args.out or sweep_dir
    cmd = sweep_command(
        args.name, overrides, args.log_dir, args.fusions.split(","), args.backbones.split(",")
    )
    shown = "python " + " ".join(shlex.quote(c) for c in [str(Path(cmd[1]).relative_to(REPO)), *cmd[2:]])
    shown = shown.replace(str(REPO) + "/", "")
    wall = None
    if not args.collect_only:
        print(f"[ablate] {shown}\n[ablate] sweep folder: {sweep_dir}", flush=True)
        t0 = time.time()
        subprocess.run(cmd, cwd=REPO, check=True)
        wall = time.time() - t0
    merged = [args.log_dir / "ablation" / "multiruns" / m for m in args.merge.split(",") if m]
    made = collect([*merged, sweep_dir], out, command=shown, wall_s=wall)
    print(f"[ablate] table {made['table']}\n[ablate] plot  {made['plot']}")
    if args.collect_only:  # command.txt keeps the command that ran the sweep
        return
    user_cmd = "make ablate" + (f" ARGS={shlex.quote(' '.join(sys.argv[1:]))}" if sys.argv[1:] else "")
    (out / "command.txt").write_text(f"{user_cmd}\n# = {shown}\n# wall time {wall:.0f} s\n")


if __name__ == "__main__":
    main()
