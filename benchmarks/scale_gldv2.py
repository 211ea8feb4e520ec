"""Scale test of the GLDv2 training data path at GLDv2-clean's own size (`make scale`).

What runs is the real path of ``python src/train.py experiment=dalg_gldv2 model=dalg_tiny``:

* the list: a generated ``train_clean.csv`` with GLDv2-clean's 81,313 landmarks and 1,580,470 distinct 16-hex-digit
  image ids (landmark ids drawn from GLDv2's 0..203,093 range, long-tailed class sizes, one row per landmark:
  ``landmark_id,images``), read by ``dalg.data.gldv2`` exactly as a downloaded one;
* the data: ``data=gldv2`` as the paper recipe sets it (512 px crops, per-GPU batch 8, 8 workers), the
  recipe's sampler (``ResumableLoader``: the permutation of an epoch drawn from seed + epoch, as train.py wraps it);
* the model: ``dalg_tiny`` with the full-size margin head (81,313 classes x 512), the recipe's optimiser.

The files: the training order depends only on (seed, epoch), so the images the loader will read in its first
batches are known before it starts. Only those ids get a file, a symlink at their GLDv2 path
``train/a/b/c/<id>.jpg`` to a photo of a small pool (landmarks-mini's, else generated JPEGs); the dataset
builds and opens the paths with its own code. Any other read would be a missing file, which the dataset replaces
and counts: the run fails if a single image was unreadable, so every figure comes from real decoded files.

Figures: DataModule setup time (CSV parse, relabelling, sample table), peak memory of the main process plus its
DataLoader workers, first-batch latency (worker start + 8 decoded and augmented 512 px crops), and the first
and second optimiser steps (forward, margin head, backward, step; timed once the workers have filled their
prefetch queue, so that they do not compete for the CPU). Memory of forked workers: their RSS counts
the pages they share with the main process again, so the figure held against the goal is the main process's peak
RSS plus each worker's peak private memory (USS); the naive sum of RSS is recorded beside it.

    python benchmarks/scale_gldv2.py                       # writes experiments/scale/results.{md,json}
    python benchmarks/scale_gldv2.py --n-images 100000 --n-classes 5145 --out /tmp/scale
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import hydra  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

import dalg.utils.config  # noqa: E402,F401  (registers ${repo_root:})
from dalg.train_pipeline import build_module, make_train_loader_resumable  # noqa: E402
from dalg.utils.atomic import write_json_atomic, write_text_atomic  # noqa: E402

GLDV2_CLEAN_IMAGES = 1_580_470  # GLDv2-clean train set (dalg.md)
GLDV2_CLEAN_CLASSES = 81_313
GLDV2_LANDMARK_IDS = 203_094  # GLDv2's landmark ids run 0..203,093
GOALS = {"setup_seconds": 60.0, "peak_rss_gib": 6.0}  # issue 11, item 13: on the 2-core machine
DEFAULT_POOL = REPO.parent / "shared" / "data" / "landmarks-mini" / "jpg"
GIB = 2**30


# ------------------------------------------------------------------------------------------------ the list
def class_sizes(n_images: int, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Long-tailed class sizes >= 1 summing to ``n_images`` (lognormal weights; GLDv2-clean: mean 19.4)."""
    if n_classes < 1 or n_images < n_classes:
        raise ValueError(f"need n_images >= n_classes >= 1, got {n_images} images for {n_classes} classes")
    weights = rng.lognormal(0.0, 1.2, n_classes)
    return 1 + rng.multinomial(n_images - n_classes, weights / weights.sum())


def write_train_clean(root: Path, n_images: int, n_classes: int, seed: int = 0) -> dict[str, Any]:
    """``root/train_clean.csv`` in GLDv2-clean's format; returns a few facts about it."""
    rng = np.random.default_rng(seed)
    sizes = class_sizes(n_images, n_classes, rng)
    landmarks = np.sort(rng.choice(max(GLDV2_LANDMARK_IDS, n_classes), n_classes, replace=False))
    while True:  # 16 hex digits like GLDv2's ids; 64 random bits, so a repeat is ~1e-7 likely at 1.58M
        raw = rng.integers(0, 2**64, size=n_images, dtype=np.uint64)
        if len(np.unique(raw)) == n_images:
            break
    ids = [f"{x:016x}" for x in raw.tolist()]
    ends = np.cumsum(sizes).tolist()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "train_clean.csv", "w", encoding="utf-8") as f:
        f.write("landmark_id,images\n")
        start = 0
        for lid, end in zip(landmarks.tolist(), ends):
            f.write(f"{lid},{' '.join(ids[start:end])}\n")
            start = end
    return {
        "csv_bytes": (root / "train_clean.csv").stat().st_size,
        "largest_class": int(sizes.max()),
        "median_class": float(np.median(sizes)),
        "smallest_class": int(sizes.min()),
    }


def make_pool(folder: Path, n: int = 16, seed: int = 0) -> list[Path]:
    """``n`` photo-like JPEGs (smooth gradients + noise, longer side 640 like landmarks-mini)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        w, h = (640, 480) if k % 3 else (480, 640)
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * (k % 7 + 1)) % 256, (yy * (k % 5 + 1)) % 256, (xx + yy) % 256], -1)
        img = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        paths.append(folder / f"pool{k:03d}.jpg")
        Image.fromarray(img).save(paths[-1], quality=90)
    return paths


def link_batches(dataset, batch_sampler, n_batches: int, pool: list[Path]) -> list[list[Path]]:
    """Symlink pool photos at the GLDv2 paths of every image in the sampler's first ``n_batches`` batches;
    returns the paths, batch by batch."""
    linked = []
    for b, batch in enumerate(batch_sampler):
        if b == n_batches:
            break
        linked.append([])
        for index, _seed in batch:
            path = dataset.path(int(index))  # the dataset's own path building: <root>/train/a/b/c/<id>.jpg
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(pool[int(index) % len(pool)], path)
            linked[-1].append(path)
    return linked


# ---------------------------------------------------------------------------------------------- memory
def _uss(proc: psutil.Process) -> int:
    try:
        return proc.memory_full_info().uss
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0


class TreeMemory:
    """Peak memory of this process and its children (DataLoader workers), sampled in a background thread.

    ``peak_bytes``: the main process's RSS plus the children's private memory (USS), the most the job held at
    one sample: a forked worker's RSS counts the pages it shares with its parent again. ``peak_rss_sum_bytes``
    is that naive sum of RSS, for comparison. The main process's own peak is also read from VmHWM (exact).
    """

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.proc = psutil.Process()
        self.peak_bytes = self.peak_rss_sum_bytes = self.peak_children = 0
        self.peak_children_uss_bytes = 0
        self._stop = threading.Event()
        self._before: set[int] = set()  # children that existed before the block (not its workers)

    def _children(self) -> list[psutil.Process]:
        # only processes started inside the block: in a test session a W&B service or a browser started by an
        # earlier test is a child too, and is neither a worker nor this job's memory
        return [c for c in self.proc.children(recursive=True) if c.pid not in self._before]

    def sample(self) -> None:
        main = self.proc.memory_info().rss
        children = self._children()
        uss = sum(_uss(c) for c in children)
        rss = 0
        for c in children:
            try:
                rss += c.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        self.peak_bytes = max(self.peak_bytes, main + uss)
        self.peak_rss_sum_bytes = max(self.peak_rss_sum_bytes, main + rss)
        self.peak_children_uss_bytes = max(self.peak_children_uss_bytes, uss)
        self.peak_children = max(self.peak_children, len(children))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> TreeMemory:
        self._before = {c.pid for c in self.proc.children(recursive=True)}
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        # the main process's exact peak (VmHWM) can exceed what the sampler saw between two samples
        self.peak_bytes = max(self.peak_bytes, main_peak_rss_bytes() + self.peak_children_uss_bytes)


def wait_for_idle_children(timeout: float = 120.0, interval: float = 0.5) -> float:
    """Wait until this process's children (DataLoader workers) use < 10% of a core, e.g. once they have filled
    the loader's prefetch queue; returns the seconds waited. On 2 cores, 8 workers filling 16 batches of 512 px
    crops would otherwise take most of the CPU from the optimiser step being timed."""
    me, t0 = psutil.Process(), time.perf_counter()

    def cpu_seconds() -> float:
        total = 0.0
        for c in me.children(recursive=True):
            try:
                t = c.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    before = cpu_seconds()
    while time.perf_counter() - t0 < timeout:
        time.sleep(interval)
        now = cpu_seconds()
        if now - before < 0.1 * interval:
            break
        before = now
    return time.perf_counter() - t0


def main_peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return psutil.Process().memory_info().rss


# ------------------------------------------------------------------------------------------------- run
def compose_recipe(root: Path, model: str, overrides: list[str]):
    """``experiment=dalg_gldv2`` (data=gldv2 and the paper recipe) with ``model`` and random weights; the
    ROxf/RPar evaluation sets are left out (the training path is measured)."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[
                "experiment=dalg_gldv2",
                f"model={model}",
                f"data.root={root}",
                "model.backbone.pretrained=false",
                "~data.eval_sets.roxford5k",
                "~data.eval_sets.rparis6k",
                *overrides,
            ],
        )


def run(
    n_images: int = GLDV2_CLEAN_IMAGES,
    n_classes: int = GLDV2_CLEAN_CLASSES,
    pool: list[Path] | None = None,
    work_dir: Path | None = None,
    model: str = "dalg_tiny",
    overrides: list[str] | None = None,
    steps: int = 2,
    seed: int = 0,
    log=print,
) -> dict[str, Any]:
    """Generate the list, run the data path and ``steps`` optimiser steps; returns the figures."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    own_tmp = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="dalg-scale-")) if own_tmp else Path(work_dir)
    try:
        return _run(work, n_images, n_classes, pool, model, list(overrides or []), steps, seed, log)
    finally:
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)


def _run(
    work: Path,
    n_images: int,
    n_classes: int,
    pool: list[Path] | None,
    model: str,
    overrides: list[str],
    steps: int,
    seed: int,
    log,
) -> dict[str, Any]:
    root = work / "gldv2"
    t0 = time.perf_counter()
    csv_facts = write_train_clean(root, n_images, n_classes, seed)
    generate_s = time.perf_counter() - t0
    log(
        f"generated train_clean.csv: {n_images:,} ids, {n_classes:,} landmarks, {csv_facts['csv_bytes'] / 1e6:.1f} MB "
        f"in {generate_s:.1f} s"
    )
    pool = pool or make_pool(work / "pool")
    cfg = compose_recipe(root, model, overrides)
    load_before = os.getloadavg()

    with TreeMemory() as memory:
        t0 = time.perf_counter()
        dm = hydra.utils.instantiate(cfg.data)
        dm.prepare_data()
        dm.setup("fit")
        setup_s = time.perf_counter() - t0
        log(f"DataModule setup: {setup_s:.2f} s ({len(dm.train_set):,} images, {dm.num_classes:,} classes)")

        make_train_loader_resumable(dm, [], int(cfg.seed))  # what train.py does: the recipe's sampler
        loader = dm.train_dataloader()
        workers = loader.num_workers
        prefetch = (loader.prefetch_factor or 2) * max(1, workers)
        linked = link_batches(dm.train_set, loader.batch_sampler, prefetch + steps + 4, pool)

        t0 = time.perf_counter()
        module = build_module(cfg, dm.num_classes)
        build_s = time.perf_counter() - t0
        module.train()
        # no Lightning loop: training_step's logging has nowhere to go, and configure_optimizers reads the run
        # length (one process: batches per epoch x epochs) from a stand-in for the trainer
        module.log = lambda *a, **k: None
        module.trainer = SimpleNamespace(
            estimated_stepping_batches=len(loader) * int(cfg.trainer.max_epochs),
            max_epochs=int(cfg.trainer.max_epochs),
        )
        optim = module.configure_optimizers()
        optimizer, schedule = optim["optimizer"], optim["lr_scheduler"]["scheduler"]

        t0 = time.perf_counter()
        it = iter(loader)
        images, labels = next(it)
        first_batch_s = time.perf_counter() - t0
        log(f"first batch: {first_batch_s:.2f} s ({workers} workers, batch {tuple(images.shape)})")
        settle_s = wait_for_idle_children() if workers else 0.0

        step_s, losses = [], []
        for s in range(steps):
            if s:
                images, labels = next(it)
            t0 = time.perf_counter()
            # what Lightning does after moving the batch: jitter + normalise the uint8 crops (DeviceAugment)
            batch = dm.on_after_batch_transfer((images, labels), 0)
            loss = module.training_step(batch, s)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step_s.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
            log(f"optimiser step {s + 1}: {step_s[-1]:.2f} s, loss {losses[-1]:.3f}")
        memory.sample()
        if hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()  # persistent workers would outlive the measurement otherwise
        failures = dm.full_train_set.collect_failures()

    if failures.total_images or failures.total_classes:
        raise RuntimeError(
            f"{failures.total_images} image(s) could not be read (not linked?): {failures.message()}"
        )
    head = module.net.head
    result = {
        "n_images": len(dm.train_set),
        "n_classes": dm.num_classes,
        "setup_seconds": round(setup_s, 3),
        "first_batch_seconds": round(first_batch_s, 3),
        "step_seconds": round(step_s[0], 3),
        "later_step_seconds": [round(s, 3) for s in step_s[1:]],
        "workers_settle_seconds": round(settle_s, 3),
        "peak_rss_gib": round(memory.peak_bytes / GIB, 3),
        "peak_rss_sum_gib": round(memory.peak_rss_sum_bytes / GIB, 3),
        "main_peak_rss_gib": round(main_peak_rss_bytes() / GIB, 3),
        "workers_peak_uss_gib": round(memory.peak_children_uss_bytes / GIB, 3),
        "workers": workers,
        "workers_seen": memory.peak_children,
        "batch_size": int(images.shape[0]),
        "train_size": int(images.shape[-1]),
        "batch_shape": list(images.shape),
        "labels_in_range": bool(0 <= int(labels.min()) and int(labels.max()) < dm.num_classes),
        "losses": [round(x, 4) for x in losses],
        "head_weight_shape": list(head.weight.shape),
        "model": model,
        "model_build_seconds": round(build_s, 3),
        "optimizer": str(cfg.optim.optimizer._target_),
        "first_step_lr": optimizer.param_groups[0]["initial_lr"] * schedule.lr_lambdas[0](0),
        "generate_seconds": round(generate_s, 3),
        "files_linked": len({p for batch in linked for p in batch}),
        "pool_size": len(pool),
        "unreadable_images": failures.total_images,
        "first_batch_paths": [str(p.relative_to(root)) for p in linked[0]],
        "csv": csv_facts,
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "goals": GOALS,
    }
    result["goals_met"] = {k: result[k] <= v for k, v in GOALS.items()}
    return result


# ---------------------------------------------------------------------------------------------- report
def markdown(r: dict[str, Any], command: str) -> str:
    ok = {True: "met", False: "**missed**"}
    m = r["machine"]
    rows = [
        ("images / classes", f"{r['n_images']:,} / {r['n_classes']:,}", ""),
        (
            "DataModule setup",
            f"{r['setup_seconds']:.1f} s",
            f"<= {GOALS['setup_seconds']:.0f} s: {ok[r['goals_met']['setup_seconds']]}",
        ),
        (
            "peak memory, main RSS + workers' USS",
            f"{r['peak_rss_gib']:.2f} GiB",
            f"<= {GOALS['peak_rss_gib']:.0f} GiB: {ok[r['goals_met']['peak_rss_gib']]}",
        ),
        ("  naive sum of RSS (shared pages counted per process)", f"{r['peak_rss_sum_gib']:.2f} GiB", ""),
        ("  main process peak RSS", f"{r['main_peak_rss_gib']:.2f} GiB", ""),
        (
            "  workers' private memory (USS), together",
            f"{r['workers_peak_uss_gib']:.2f} GiB",
            f"{r['workers_seen']} workers",
        ),
        (
            "first batch",
            f"{r['first_batch_seconds']:.2f} s",
            f"batch {r['batch_shape']}, {r['workers']} workers",
        ),
        (
            "workers filling the prefetch queue (not timed)",
            f"{r['workers_settle_seconds']:.1f} s",
            "steps are timed once the workers idle",
        ),
        (
            "optimiser step 1",
            f"{r['step_seconds']:.2f} s",
            f"{r['model']}, head {r['head_weight_shape']}, "
            f"{r['optimizer'].rsplit('.', 1)[-1]}, loss {r['losses'][0]:.2f}",
        ),
        *[(f"optimiser step {k + 2}", f"{s:.2f} s", "") for k, s in enumerate(r["later_step_seconds"])],
        (
            "generating the list (not timed above)",
            f"{r['generate_seconds']:.1f} s",
            f"{r['csv']['csv_bytes'] / 1e6:.0f} MB",
        ),
    ]
    lines = [
        "# GLDv2-clean at full size: the training data path (`make scale`)",
        "",
        f"Command: `{command}`",
        "",
        "| figure | value | note |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        f"List: generated `train_clean.csv`, class sizes {r['csv']['smallest_class']}..{r['csv']['largest_class']} "
        f"(median {r['csv']['median_class']:.0f}). Files: {r['files_linked']} symlinks at their GLDv2 paths to "
        f"{r['pool_size']} pool photos, {r['unreadable_images']} unreadable. Machine: {m['cpu_count']} CPUs, torch "
        f"{m['torch']}, load average {m['load_average_before'][0]} before, {m['load_average_after'][0]} after.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-images", type=int, default=GLDV2_CLEAN_IMAGES)
    ap.add_argument("--n-classes", type=int, default=GLDV2_CLEAN_CLASSES)
    ap.add_argument(
        "--pool",
        type=Path,
        default=DEFAULT_POOL,
        help="folder of JPEGs the linked files point to (default: landmarks-mini; generated if absent)",
    )
    ap.add_argument("--model", default="dalg_tiny")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "experiments" / "scale")
    ap.add_argument(
        "overrides", nargs="*", help="Hydra overrides of the train config, e.g. data.num_workers=4"
    )
    args = ap.parse_args(argv)
    pool = sorted(args.pool.glob("*.jpg")) if args.pool.is_dir() else None
    result = run(
        args.n_images,
        args.n_classes,
        pool,
        model=args.model,
        overrides=args.overrides,
        steps=args.steps,
        seed=args.seed,
        log=lambda s: print(s, flush=True),
    )
    command = " ".join(
        ["python benchmarks/scale_gldv2.py", *(argv if argv is not None else sys.argv[1:])]
    ).strip()
    result["command"] = command
    write_json_atomic(result, args.out / "results.json")
    write_text_atomic(markdown(result, command), args.out / "results.md")
    print(markdown(result, command))
    print(f"wrote {args.out / 'results.json'} and results.md")
    return result


if __name__ == "__main__":
    main()
