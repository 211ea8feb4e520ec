"""Training-step throughput (images/s) and peak memory of the tiny CPU config (the default `make run` model).

One step = forward, margin-softmax cross-entropy, backward, AdamW step with the project's parameter groups,
on random tensors of the configured batch and train size (data loading is benchmarks/bench_loader.py's job).
run_all.py runs this file as its own process, so that the peak memory is that of a process that only trains:

    python benchmarks/bench_train.py --json /tmp/train.json [--model dalg_tiny --steps 6 --batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from measure import PeakRSS, median, process_peak_rss_bytes, sync, timed

from dalg.lit.optim import build_optimizer
from dalg.utils.config import REPO_ROOT  # also registers ${repo_root:}


def train_config(model: str, overrides: list[str] | None = None):
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        # random weights: a step costs the same, and the bench needs no network
        return compose(
            config_name="train",
            overrides=[f"model={model}", "model.backbone.pretrained=false", *(overrides or [])],
        )


def run(
    model: str = "dalg_tiny",
    steps: int = 6,
    warmup: int = 2,
    batch_size: int | None = None,
    size: int | None = None,
    device: torch.device = torch.device("cpu"),
    log=print,
) -> dict[str, Any]:
    cfg = train_config(model)
    batch_size = int(batch_size or cfg.data.batch_size)
    size = int(size or cfg.data.train_size)
    num_classes = int(cfg.data.generator.train_classes)
    torch.manual_seed(0)
    net = hydra.utils.instantiate(cfg.model, num_classes=num_classes).to(device).train()
    opt = build_optimizer(
        hydra.utils.instantiate(cfg.optim.optimizer, _partial_=True),
        net,
        float(cfg.optim.get("weight_decay", 0.0)),
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, size, size, generator=g).to(device)
    y = torch.randint(0, num_classes, (batch_size,), generator=g).to(device)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net.head(net(x), y), y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    with PeakRSS() as rss:
        times = [timed(step, device) for _ in range(steps)]
    t = median(times)
    out = {
        "model": model,
        "batch_size": batch_size,
        "train_size": size,
        "num_classes": num_classes,
        "process_peak_rss_mib": process_peak_rss_bytes() / 2**20,
        "steps": steps,
        "warmup_steps": warmup,
        "step_seconds": [round(s, 4) for s in times],
        "images_per_s": batch_size / t,
        "peak_rss_mib": rss.peak / 2**20,
        "rss_before_mib": rss.start / 2**20,
        "params_m": sum(p.numel() for p in net.parameters()) / 1e6,
        "optimizer": str(cfg.optim.optimizer._target_),
    }
    if device.type == "cuda":
        out["peak_cuda_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    log(
        f"  train {model} batch {batch_size} @{size}px: {out['images_per_s']:.1f} img/s, "
        f"peak RSS {out['peak_rss_mib']:.0f} MiB"
    )
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dalg_tiny")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=None, help="default: the data config's batch size")
    ap.add_argument("--size", type=int, default=None, help="default: the data config's train size")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    res = run(
        args.model,
        args.steps,
        args.warmup,
        args.batch_size,
        args.size,
        torch.device(args.device),
        log=lambda s: print(s, flush=True),
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(res, indent=2) + "\n")
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
