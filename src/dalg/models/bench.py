"""Time a training step (forward + margin head + backward) and descriptor extraction of a model config on CPU.

    python -m dalg.models.bench --model dalg_tiny --batch 64 --size 112 [--threads 1] [--iters 5]

Prints the median seconds per step and images/s; a figure to read, not a pass/fail test.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dalg.models.summary import build_model


def time_model(name: str, batch: int, size: int, iters: int = 5, overrides: list[str] | None = None) -> dict:
    torch.manual_seed(0)
    model = build_model(name, overrides, device="cpu")
    head = torch.nn.Linear(model.embed_dim, 100)  # stands in for the margin head: same cost class
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 100, (batch,))
    train = []
    for _ in range(iters + 1):
        t = time.perf_counter()
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(head(model(x)), y).backward()
        train.append(time.perf_counter() - t)
    model.eval()
    extract = []
    for _ in range(iters + 1):
        t = time.perf_counter()
        model.extract(x)
        extract.append(time.perf_counter() - t)
    step, ext = statistics.median(train[1:]), statistics.median(extract[1:])  # first call warms up
    return {
        "model": name,
        "batch": batch,
        "size": size,
        "threads": torch.get_num_threads(),
        "train_step_s": step,
        "train_img_per_s": batch / step,
        "extract_s": ext,
        "extract_img_per_s": batch / ext,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dalg_tiny")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)"
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    r = time_model(args.model, args.batch, args.size, args.iters)
    print(
        f"{r['model']}: batch {r['batch']} at {r['size']}x{r['size']}, {r['threads']} thread(s): "
        f"train step {r['train_step_s']:.3f} s ({r['train_img_per_s']:.0f} img/s), "
        f"extract {r['extract_s']:.3f} s ({r['extract_img_per_s']:.0f} img/s), median of {args.iters}"
    )


if __name__ == "__main__":
    main()
