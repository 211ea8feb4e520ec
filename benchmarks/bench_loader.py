"""Benchmark: throughput of the training loader, and how much of a training step waits for data.

For 0, 1 and 2 DataLoader workers it prints
  * decoded images/s  (JPEG read + ``load_rgb``: EXIF, mode conversion; no augmentation),
  * augmented images/s (the worker's share of the train transform: random resized crop + flip -> uint8; the
    colour jitter and normalisation run on the batch in the training step, dalg.data.device_augment),
  * the share of a training step spent waiting for the next batch, with the project's model training on it.

Images: a GLDv2-layout set generated in a temp dir (JPEGs at ``--image-size`` on the longer side, like GLDv2's
resized release), or your own with ``--root`` (a GLDv2 root; ``--csv`` names the list).

    python benchmarks/bench_loader.py                                  # defaults: 256 images, 640 px, 224 crop
    python benchmarks/bench_loader.py --root data/gldv2 --train-size 512 --batches 30 --json out.json

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
from PIL import Image
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from dalg.data.gldv2 import GLDv2Dataset, image_path  # noqa: E402
from dalg.data.transforms import train_transform  # noqa: E402


def make_images(root: Path, n: int, longer_side: int, classes: int, seed: int = 0) -> Path:
    """``n`` photo-like JPEGs (smooth gradients + noise, so they compress like photos) in the GLDv2 layout."""
    rng = np.random.default_rng(seed)
    rows: dict[int, list[str]] = {}
    for k in range(n):
        iid = f"{rng.integers(0, 2**63):016x}"
        w, h = (longer_side, longer_side * 3 // 4) if k % 3 else (longer_side * 3 // 4, longer_side)
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * (k % 7 + 1)) % 256, (yy * (k % 5 + 1)) % 256, (xx + yy) % 256], -1)
        noise = rng.normal(0, 12, (h, w, 3))
        p = image_path(root, iid)
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(p, quality=90)
        rows.setdefault(k % classes, []).append(iid)
    (root / "train_clean.csv").write_text(
        "landmark_id,images\n" + "".join(f"{lid},{' '.join(ids)}\n" for lid, ids in rows.items())
    )
    return root


class _SizeOnly:
    """Decode only: the image is fully decoded by the dataset, then reduced to a tiny tensor for collation."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.tensor(img.size)


def _loader(ds, batch_size: int, workers: int) -> DataLoader:
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers else None,
    )


def images_per_second(ds, batch_size: int, workers: int, batches: int) -> float:
    loader = _loader(ds, batch_size, workers)
    it = iter(loader)
    next(it)  # worker start-up and the first batch are not throughput
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        try:
            x, _ = next(it)
        except StopIteration:
            it = iter(loader)
            x, _ = next(it)
        n += len(x)
    return n / (time.perf_counter() - t0)


def build_model(name: str, num_classes: int) -> torch.nn.Module:
    from hydra import compose, initialize_config_dir

    import dalg.utils.config  # noqa: F401  (registers ${repo_root:})

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={name}", "model.backbone.pretrained=false"])
    import hydra

    return hydra.utils.instantiate(cfg.model, num_classes=num_classes)


def wait_share(ds, model, batch_size: int, workers: int, steps: int) -> dict[str, float]:
    """Train ``steps`` steps; time blocked in ``next(loader)`` vs. forward + backward + optimiser step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    loader = _loader(ds, batch_size, workers)
    it = iter(loader)
    x, y = next(it)  # start-up excluded
    wait = compute = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        t1 = time.perf_counter()
        x = ds.transform.finish(
            x
        )  # the device's share (jitter + normalise the uint8 crops), here in the step
        desc = model(x)
        loss = torch.nn.functional.cross_entropy(model.head(desc, y), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t2 = time.perf_counter()
        wait += t1 - t0
        compute += t2 - t1
    return {
        "wait_s_per_step": wait / steps,
        "compute_s_per_step": compute / steps,
        "wait_share": wait / (wait + compute),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help="a GLDv2 root to read instead of generated images")
    parser.add_argument("--csv", default="train_clean.csv")
    parser.add_argument("--n-images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=640, help="longer side of generated JPEGs")
    parser.add_argument("--train-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=12, help="timed batches per throughput figure")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per wait-share figure")
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument(
        "--model", default="dalg_tiny", help="model config for the training step ('' to skip)"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads in the main process (0: default)"
    )
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        if args.root:
            root = Path(args.root)
        else:
            t0 = time.perf_counter()
            root = make_images(Path(tmp), args.n_images, args.image_size, classes=max(2, args.n_images // 8))
            print(
                f"generated {args.n_images} JPEGs ({args.image_size} px longer side) in "
                f"{time.perf_counter() - t0:.1f} s under {root}"
            )
        decode_ds = GLDv2Dataset(root, args.csv, _SizeOnly())
        aug_ds = GLDv2Dataset(root, args.csv, train_transform(args.train_size))
        model = build_model(args.model, aug_ds.num_classes) if args.model else None
        print(
            f"{len(aug_ds)} images, {aug_ds.num_classes} classes, batch {args.batch_size}, crop {args.train_size}, "
            f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, model {args.model or '-'}"
        )
        results = []
        for workers in (int(w) for w in args.workers.split(",")):
            row = {
                "workers": workers,
                "decoded_img_s": images_per_second(decode_ds, args.batch_size, workers, args.batches),
                "augmented_img_s": images_per_second(aug_ds, args.batch_size, workers, args.batches),
            }
            if model is not None:
                row.update(wait_share(aug_ds, model, args.batch_size, workers, args.steps))
            results.append(row)
            print(
                f"  workers={workers}: decoded {row['decoded_img_s']:7.1f} img/s, augmented "
                f"{row['augmented_img_s']:7.1f} img/s"
                + (
                    f", step {row['wait_s_per_step'] + row['compute_s_per_step']:.3f} s of which waiting for data "
                    f"{100 * row['wait_share']:.0f}%"
                    if model is not None
                    else ""
                ),
                flush=True,
            )

    header = f"{'workers':>7} | {'decoded img/s':>13} | {'augmented img/s':>15} | {'wait share':>10}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in results:
        share = f"{100 * r['wait_share']:.0f}%" if "wait_share" in r else "-"
        print(
            f"{r['workers']:>7} | {r['decoded_img_s']:>13.1f} | {r['augmented_img_s']:>15.1f} | {share:>10}"
        )
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_name(f".{out.name}.tmp")
        tmp_out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
        os.replace(tmp_out, out)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
