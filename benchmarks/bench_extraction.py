"""Descriptor extraction throughput / latency / achieved GFLOP/s of DALG (one scale) and DOLG (five and one).

Every variant (model x scales x inference options) extracts the same real photographs at their own aspect
ratios (longer side = test size), once per round, variants interleaved (A, B, C, A, B, C, ...); medians
over rounds.  The dense matmul GFLOP/s of this machine is measured between rounds, so the fraction of peak
is computed against a figure taken under the same load.  FLOPs come from FlopCounterMode on the meta device
(dalg.tools.model_table.count_flops conventions: 2 per multiply-add; matmuls, convolutions, attention).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from measure import interleaved, matmul_gflops, median, timed
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dalg.data.transforms import eval_transform
from dalg.inference import InferenceModel, InferenceOptions, extract_images, optimize_for_inference
from dalg.tools.model_table import build_model  # also registers the CPU SDPA FLOP formula
from dalg.utils.input_config import InputConfig

DOLG_SCALES = (0.3535, 0.5, 0.7071, 1.0, 1.4142)
# (tokens, width, 4 x width): ViT-S/16's MLP input GEMM for one 384 x 512 image, the practical ceiling of its layers
VIT_S_GEMM = (768, 384, 1536)


@dataclass
class Variant:
    model: str  # config name in conf/model
    scales: tuple[float, ...]
    options: InferenceOptions | None  # None = the model's own extract() under no_grad (the "before")
    max_batch: int = 1  # > 1: images of equal shape are batched (aspect-ratio batching)
    tag: str = ""  # group label in the table, e.g. "dalg_cross@1"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def how(self) -> str:
        if self.options is None:
            return "plain (eval, no_grad, fp32)"
        s = "inference_mode, " + self.options.label()
        return s + (f", batch<= {self.max_batch} by shape" if self.max_batch > 1 else "")

    @property
    def name(self) -> str:
        return f"{self.tag} | {self.how}"


def load_images(
    image_dir: Path | None, n: int, size: int, seed: int = 0, input_config: InputConfig | None = None
) -> tuple[list[torch.Tensor], list[str]]:
    """``n`` photos spread evenly over the sorted folder, resized (longer side ``size``, sides rounded to the
    model's size multiple) and normalised with ``input_config`` (a model's; None: ImageNet, no rounding).

    Without a folder, views of the synthetic generator's scenes (mixed aspect ratios) are used instead.
    """
    tf = eval_transform(size, input_config)
    if image_dir is not None:
        from dalg.data.images import load_rgb

        paths = sorted(Path(image_dir).glob("*.jpg"))
        if not paths:
            raise FileNotFoundError(f"no .jpg images in {image_dir}")
        idx = np.linspace(0, len(paths) - 1, num=min(n, len(paths))).round().astype(int)
        chosen = [paths[i] for i in idx]
        return [tf(load_rgb(p)) for p in chosen], [p.name for p in chosen]
    from dalg.data.synthetic import render_scene, render_view

    rng = np.random.default_rng(seed)
    shapes = [(4 * size // 3, size), (size, 4 * size // 3), (size, size), (3 * size // 2, size)]
    images, names = [], []
    for i in range(n):
        img, _ = render_view(render_scene(rng), rng, 0.5, shapes[i % len(shapes)])
        images.append(tf(img))
        names.append(f"synthetic_{i}")
    return images, names


def count_extract_flops(meta_model: nn.Module, shape: Sequence[int], scales: Sequence[float]) -> int:
    """FLOPs of ``extract`` of one (C, H, W) image at ``scales`` (meta device: nothing is computed)."""
    x = torch.zeros(1, *shape, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        meta_model.extract(x, scales)
    return int(counter.get_total_flops())


def _extractor(
    v: Variant, plain: nn.Module, cache: dict[tuple, InferenceModel]
) -> nn.Module | InferenceModel:
    if v.options is None:
        return plain
    key = (v.model, v.options)
    if key not in cache:
        cache[key] = optimize_for_inference(plain, v.options)
    return cache[key]


def run(
    variants: list[Variant],
    images: Sequence[torch.Tensor] | Callable[[nn.Module], Sequence[torch.Tensor]],
    rounds: int,
    device: torch.device,
    matmul_n: int = 2048,
    peak_seconds: float = 1.0,
    log=print,
) -> dict[str, Any]:
    """Interleaved timing of all variants; returns per-variant figures and the matmul peaks of the run.

    ``images``: the same tensors for every model, or a function giving a model its own (each model's input
    normalisation and size multiple, e.g. ``lambda m: load_images(..., input_config=m.input_config)[0]``).
    """
    plain_models: dict[str, nn.Module] = {}
    meta_models: dict[str, nn.Module] = {}
    model_images: dict[str, list[torch.Tensor]] = {}
    for name in dict.fromkeys(v.model for v in variants):
        torch.manual_seed(0)
        plain_models[name] = build_model(name, device=str(device)).eval()
        meta_models[name] = build_model(name, device="meta").eval()
        model_images[name] = list(images(plain_models[name]) if callable(images) else images)
    cache: dict[tuple, InferenceModel] = {}
    extractors = {}
    for v in variants:
        ext = _extractor(v, plain_models[v.model], cache)
        if isinstance(ext, InferenceModel):
            v.options = (
                ext.options
            )  # resolved (automatic choices made), so labels and dtypes are the real ones
        extractors[v.name] = ext

    flops: dict[tuple, int] = {}
    for v in variants:
        for img in model_images[v.model]:
            key = (v.model, tuple(img.shape), v.scales)
            if key not in flops:
                flops[key] = count_extract_flops(meta_models[v.model], img.shape, v.scales)
    images_dev = {name: [im.to(device) for im in ims] for name, ims in model_images.items()}

    per_image: dict[str, list[float]] = {v.name: [] for v in variants}
    descriptors: dict[str, torch.Tensor] = {}

    def make_fn(v: Variant):
        ext = extractors[v.name]
        ims = images_dev[v.model]

        def fn() -> None:
            if v.max_batch > 1:
                descriptors[v.name] = extract_images(ext, ims, v.scales, max_batch=v.max_batch)
                return
            outs = []
            for im in ims:
                box: list[torch.Tensor] = []
                per_image[v.name].append(
                    timed(lambda im=im, box=box: box.append(ext.extract(im[None], v.scales)), device)
                )
                outs.append(box[0].float())
            descriptors[v.name] = torch.cat(outs)

        return fn

    fns = {v.name: make_fn(v) for v in variants}
    warm = {}
    for v in variants:  # warm-up: one pass over every shape (torch.compile compiles here), not timed
        warm[v.name] = timed(fns[v.name], device)
        per_image[v.name].clear()
        log(f"  warm-up {v.name}: {warm[v.name]:.1f} s")

    dtypes = {"float32": torch.float32}
    if any(v.options is not None and v.options.bf16 for v in variants):
        dtypes["bfloat16"] = torch.bfloat16
    peaks: dict[str, list[float]] = {k: [] for k in dtypes}
    vit_gemm: dict[str, list[float]] = {k: [] for k in dtypes}

    def between(r: int) -> None:
        for name, dt in dtypes.items():
            peaks[name].append(matmul_gflops(matmul_n, dt, device, min_seconds=peak_seconds))
            vit_gemm[name].append(
                matmul_gflops(0, dt, device, min_seconds=peak_seconds / 2, shape=VIT_S_GEMM)
            )
        log(
            f"  round {r + 1}/{rounds}: matmul {matmul_n}^2 "
            + ", ".join(f"{k} {v[-1]:.0f}" for k, v in peaks.items())
            + " GFLOP/s; ViT-S MLP-shaped GEMM "
            + ", ".join(f"{k} {v[-1]:.0f}" for k, v in vit_gemm.items())
            + " GFLOP/s"
        )

    times = interleaved(fns, rounds, device, between=between)
    peak = {k: median(v) for k, v in peaks.items() if v}

    # every variant of a model must give the same descriptors as the plain one (bf16: close)
    results = []
    for v in variants:
        ims = model_images[v.model]
        total_flops = sum(flops[(v.model, tuple(im.shape), v.scales)] for im in ims)
        t = median(times[v.name])
        dtype = "bfloat16" if (v.options is not None and v.options.bf16) else "float32"
        ref_name = next(
            (u.name for u in variants if u.model == v.model and u.scales == v.scales and u.options is None),
            None,
        )
        cos_min = None
        if ref_name is not None and ref_name in descriptors:
            cos_min = float((descriptors[v.name].cpu() * descriptors[ref_name].cpu()).sum(1).min())
        achieved = total_flops / t / 1e9
        results.append(
            {
                "tag": v.tag,
                "how": v.how,
                "model": v.model,
                "scales": list(v.scales),
                "options": v.options.label() if v.options is not None else "plain",
                "max_batch": v.max_batch,
                "dtype": dtype,
                "n_images": len(ims),
                "round_seconds": [round(x, 4) for x in times[v.name]],
                "warmup_seconds": round(warm[v.name], 3),
                "images_per_s": len(ims) / t,
                "latency_ms_median": median(per_image[v.name]) * 1e3 if per_image[v.name] else None,
                "gflops_per_image": total_flops / len(ims) / 1e9,
                "achieved_gflops_per_s": achieved,
                "matmul_peak_gflops_per_s": peak.get(dtype),
                "fraction_of_matmul_peak": achieved / peak[dtype] if dtype in peak else None,
                "min_cosine_to_plain": cos_min,
            }
        )
        log(
            f"  {v.name}: {len(ims) / t:.3f} img/s, {achieved:.1f} GFLOP/s"
            + (f", cos>= {cos_min:.4f}" if cos_min is not None else "")
        )
    return {
        "variants": results,
        "matmul_peak_gflops_per_s": peak,
        "matmul_rounds_gflops_per_s": {k: [round(x, 1) for x in v] for k, v in peaks.items() if v},
        "matmul_n": matmul_n,
        "matmul_seconds_per_figure": peak_seconds,
        "vit_s_gemm_shape": list(VIT_S_GEMM),
        "vit_s_gemm_gflops_per_s": {k: median(v) for k, v in vit_gemm.items() if v},
        "image_shapes": {name: [list(i.shape[1:]) for i in ims] for name, ims in model_images.items()},
        "input_configs": {
            name: getattr(m, "input_config", InputConfig()).to_dict() for name, m in plain_models.items()
        },
    }


def best(results: list[dict], tag: str, optimised: bool) -> dict | None:
    """Fastest row of ``tag`` among plain (``optimised=False``) or optimised rows; compiled rows are left out
    (only one-scale models get them, so they would tilt the DALG / DOLG-5-scale ratio)."""
    rows = [
        r
        for r in results
        if r["tag"] == tag and (r["options"] != "plain") == optimised and "compile" not in r["options"]
    ]
    return max(rows, key=lambda r: r["images_per_s"]) if rows else None
