"""Parameters, GFLOPs and descriptor size of every model config: `python src/model_table.py` (`make models`).

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode, which counts matrix multiplications,
convolutions and attention (2 FLOPs per multiply-add; element-wise ops, norms and softmax are not counted,
as in the usual GFLOPs tables). Models are built on the `meta` device, so nothing is allocated or computed and
even ResNet-101 at five scales is counted in seconds.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

from dalg.factory import create_model, model_names
from dalg.utils.atomic import write_text_atomic
from dalg.utils.sizes import scaled_side


def _register_cpu_sdpa() -> None:
    """FlopCounterMode knows the CUDA attention kernels but not the CPU one; count it with the same formula."""
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    from torch.utils.flop_counter import flop_registry

    if op in flop_registry:
        return

    @register_flop_formula(op)
    def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


_register_cpu_sdpa()


@dataclass
class ModelStats:
    name: str
    params_m: float  # without the margin head (it depends on the number of training classes)
    backbone_params_m: float
    gflops: float  # one image at size x size, one scale
    gflops_all_scales: float  # one image, summed over the config's test scales
    scales: tuple[float, ...]
    descriptor_dim: int
    input_mean: tuple[float, float, float]  # the normalisation its inputs get (dalg.utils.input_config)
    input_std: tuple[float, float, float]


def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs (2 per multiply-add) of `model(x)`, inference mode."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops())


def build_model(name: str, overrides: Mapping[str, Any] | None = None, device: str = "meta") -> nn.Module:
    """The architecture of model config ``name`` with random weights (sizes and costs need no pretrained ones),
    its tensors on ``device``; ``overrides`` are ``dalg.create_model``'s keyword arguments."""
    with torch.device(device):
        return create_model(name, pretrained=False, **dict(overrides or {}))


def model_stats(
    name: str, size: int = 512, overrides: Mapping[str, Any] | None = None, device: str = "meta"
) -> ModelStats:
    model = build_model(name, overrides, device)
    params = sum(p.numel() for p in model.parameters())
    bb = sum(p.numel() for p in model.backbone.parameters())
    flops = {}
    for s in sorted(set(model.scales) | {1.0}):
        side = scaled_side(size, s, model.input_config.size_multiple)  # the size extract() gives it
        flops[s] = count_flops(model, torch.zeros(1, 3, side, side, device=device))
    return ModelStats(
        name,
        params / 1e6,
        bb / 1e6,
        flops[1.0] / 1e9,
        sum(flops[s] for s in model.scales) / 1e9,
        tuple(model.scales),
        model.embed_dim,
        model.input_config.mean,
        model.input_config.std,
    )


def _triple(values: tuple[float, ...]) -> str:
    return ", ".join(f"{v:g}" for v in values)


def markdown_table(rows: list[ModelStats], size: int) -> str:
    head = (
        f"| model | params (M) | backbone params (M) | GFLOPs @{size}x{size}, 1 scale | "
        f"GFLOPs @{size}, its test scales | test scales | descriptor dim | input mean | input std |\n"
        "|---|---:|---:|---:|---:|---|---:|---|---|\n"
    )
    body = "".join(
        f"| {r.name} | {r.params_m:.2f} | {r.backbone_params_m:.2f} | {r.gflops:.2f} | {r.gflops_all_scales:.2f} | "
        f"{', '.join(f'{s:g}' for s in r.scales)} | {r.descriptor_dim} | {_triple(r.input_mean)} | "
        f"{_triple(r.input_std)} |\n"
        for r in rows
    )
    note = (
        "\nGFLOPs = 2 x multiply-adds (torch.utils.flop_counter.FlopCounterMode: matmuls, convolutions, "
        "attention), per image, inference; parameters exclude the margin head (it depends on the number "
        "of training classes). Input mean/std: the normalisation each model's images get, from its backbone's "
        "timm data config unless model.backbone.mean/std override it.\n"
    )
    return head + body + note


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="square input side in pixels (default 512)")
    ap.add_argument(
        "--models", nargs="*", default=None, help="model config names (default: all in conf/model)"
    )
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown table to this file")
    args = ap.parse_args(argv)
    names = args.models or model_names()
    rows = []
    for name in names:
        rows.append(model_stats(name, args.size))
        print(f"counted {name}", file=sys.stderr, flush=True)
    table = markdown_table(rows, args.size)
    print(table)
    if args.out:
        write_text_atomic(table, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
