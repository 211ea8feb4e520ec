"""Where extraction time goes, by op: torch.profiler over a few ``extract`` calls of one image, bf16 and fp32.

    python benchmarks/profile_extraction.py                        # dalg_cross, 384 x 512, 3 calls
    python benchmarks/profile_extraction.py --model dolg_r50 --calls 2

Prints one markdown table per precision (self CPU time per image and share, top ops); experiments/bench/NOTES.md
keeps the tables it was used for. Not a test.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from dalg.inference import InferenceOptions, optimize_for_inference
from dalg.tools.model_table import build_model


def table(model: torch.nn.Module, bf16: bool, shape: tuple[int, int], calls: int, top: int) -> str:
    inf = optimize_for_inference(model, InferenceOptions(bf16=bf16))
    x = torch.randn(1, 3, *shape)
    with torch.inference_mode():
        for _ in range(2):  # warm-up: kernel selection and allocations are not the steady state
            inf.extract(x, (1.0,))
        t0 = time.perf_counter()
        inf.extract(x, (1.0,))
        one = time.perf_counter() - t0
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                inf.extract(x, (1.0,))
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    name = "bf16" if bf16 else "fp32"
    lines = [
        f"{name}: one call {one * 1e3:.0f} ms",
        "",
        f"| op ({name}) | self CPU ms / image | share |",
        "|---|---:|---:|",
    ]
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        lines.append(
            f"| {e.key} | {e.self_cpu_time_total / calls / 1e3:.1f} | {100 * e.self_cpu_time_total / total:.1f}% |"
        )
    lines.append(f"| total | {total / calls / 1e3:.1f} | 100% |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dalg_cross")
    ap.add_argument("--height", type=int, default=384)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--top", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = build_model(args.model, device="cpu").eval()
    for bf16 in (True, False):
        print(table(model, bf16, (args.height, args.width), args.calls, args.top), "\n", flush=True)


if __name__ == "__main__":
    main()
