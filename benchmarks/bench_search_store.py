"""src/search.py on a 1M-row float16 feature store: peak RSS and time of the whole command (target < 4 GiB).

    python benchmarks/bench_search_store.py [--rows 1000000] [--top-k 100] [--workdir DIR] [--keep]

Builds a tiny checkpoint (dalg_tiny, random weights) and a real store of a few generated photos with
``src/extract.py``; then a store of ``--rows`` rows: the real rows first, random unit fp16 vectors after,
under the real store's json (checkpoint sha256 and fingerprint), so search.py accepts it. Runs
``python src/search.py`` on it in a fresh process (queries: the generated photos, report and grid included;
the random rows have no image, so their tiles are grey) and reports its peak RSS (the process's own VmHWM as
search.py prints it, and getrusage of the children) and wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def make_checkpoint(path: Path) -> None:
    import pytorch_lightning as pl
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    import dalg.utils.config  # noqa: F401  (registers ${repo_root:})
    from dalg.train_pipeline import build_module

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=dalg_tiny"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(path.parent)
    module = build_module(cfg, num_classes=5)
    trainer = pl.Trainer(
        logger=False, enable_checkpointing=False, accelerator="cpu", enable_model_summary=False
    )
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)


def make_photos(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = [(320, 240), (240, 320), (300, 300)][i % 3]
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * (i + 2)) % 256, (yy * (i + 3)) % 256, (xx + yy * i) % 256], -1)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)).save(
            folder / f"photo{i:02d}.jpg", quality=90
        )


def write_big_store(small: Path, big: Path, rows: int, chunk: int = 65536) -> None:
    """``small``'s rows, then random unit rows up to ``rows``, with plain file writes (no memory map)."""
    feats = np.load(f"{small}.npy")
    names = Path(f"{small}.names.txt").read_text().splitlines()
    dim = feats.shape[1]
    rng = np.random.default_rng(1)
    with open(f"{big}.npy", "wb") as f:
        header = {"descr": "<f2", "fortran_order": False, "shape": (rows, dim)}
        np.lib.format.write_array_header_1_0(f, header)
        f.write(feats.astype(np.float16).tobytes())
        for start in range(len(feats), rows, chunk):
            m = min(chunk, rows - start)
            x = rng.standard_normal((m, dim), dtype=np.float32)
            f.write((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16).tobytes())
    with open(f"{big}.names.txt", "w") as f:
        f.write("".join(f"{n}\n" for n in names))
        f.write("".join(f"random/{i:07d}.jpg\n" for i in range(rows - len(names))))
    info = json.loads(Path(f"{small}.json").read_text())
    info["count"] = rows
    Path(f"{big}.json").write_text(json.dumps(info))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep (and reuse) the stores in --workdir")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dalg_search_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt, photos, small, big = work / "tiny.ckpt", work / "photos", work / "small", work / f"big_{args.rows}"
    if not ckpt.exists():
        make_checkpoint(ckpt)
    if not photos.exists():
        make_photos(photos, args.queries)
    py = sys.executable
    if not Path(f"{small}.json").exists():
        cmd = [py, str(REPO / "src/extract.py"), f"ckpt_path={ckpt}", f"images={photos}", f"output={small}"]
        cmd += ["trainer.accelerator=cpu", "num_workers=0", f"hydra.run.dir={work / 'extract_run'}"]
        subprocess.run(cmd, check=True, capture_output=True)
    t0 = time.perf_counter()
    if not Path(f"{big}.json").exists():
        write_big_store(small, big, args.rows)
    t_gen = time.perf_counter() - t0

    cmd = [py, str(REPO / "src/search.py"), f"index={big}", f"query={photos}", f"top_k={args.top_k}"]
    cmd += ["trainer.accelerator=cpu", f"database_root={photos}", f"hydra.run.dir={work / 'search_run'}"]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if run.returncode:
        raise SystemExit(f"search.py failed:\n{run.stderr[-3000:]}")
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    own = re.search(r"peak RSS ([0-9.]+) GiB", run.stdout)
    summary = [ln for ln in run.stdout.splitlines() if "queries x" in ln]
    size = Path(f"{big}.npy").stat().st_size / 2**30
    print(f"store: {big}.npy, {args.rows:,} x 512 float16 ({size:.2f} GiB); generated in {t_gen:.1f} s")
    print(f"command: {' '.join(cmd)}")
    print(summary[0] if summary else run.stdout[-500:])
    print(f"search.py wall {wall:.1f} s; peak RSS: {own.group(1) if own else '?'} GiB (search.py's own), ")
    print(f"{children:.2f} GiB (max over this benchmark's child processes, extraction included)")
    print(f"target < 4 GiB: {'OK' if children < 4 else 'OVER'}")
    if not args.keep and args.workdir is None:
        for p in (f"{big}.npy", f"{big}.names.txt", f"{big}.json"):
            os.unlink(p)


if __name__ == "__main__":
    main()
