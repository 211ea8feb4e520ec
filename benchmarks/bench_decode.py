"""Benchmark: one loader worker decoding and augmenting realistic JPEGs to the training crop, per decoder.

GLDv2's JPEGs are mostly larger than the 512 px training crop. For generated photo-like JPEGs of 640x480,
1024x768 and 1600x1200 it times, in images/s of one process (= one DataLoader worker):

  plain_pil            PIL decodes the whole image, then the augmentation (random resized crop to 512, flip,
                       colour jitter, normalise);
  data_path_worker     what a training worker does now (dalg.data.transforms.train_transform): crop-first
                       decoding, the crop resized in torch on uint8 pixels, flip -> a uint8 tensor; colour jitter
                       and normalisation run on the batch on the device (dalg.data.device_augment), so its
                       pixel difference is measured after that share, run here;
  data_path_all_cpu    the same with the device's share run in the worker too (the data path on a CPU-only run);
  pil_draft_data_path  what the data path did before (load_rgb with need_side = crop / sqrt(min area), which
                       keeps >= 2x that side: no reduction at these sizes);
  crop_first_pil       the crop is drawn from the header size first, then libjpeg decodes at the largest DCT
                       scale (1/2, 1/4, 1/8) that still gives the crop >= 512 px on both sides
                       (dalg.data.images.load_rgb_for_crop, the data path's choice), and the crop is resized
                       from there; crop_first_pil_upscale2 lets the crop keep only 256 px (enlarged up to 2x);
  simplejpeg_full / crop_first_simplejpeg   the same with simplejpeg (libjpeg-turbo), when installed;
  torchvision_full     torchvision.io.decode_jpeg (whole image) then the same augmentation on the PIL image.

Every method applies the same crop boxes, flips and jitter factors, so the pixels can be compared: the
tolerance reported is the mean and 99.9th percentile absolute difference of the augmented images to
plain_pil, in 8-bit levels (before normalisation).

    python benchmarks/bench_decode.py                 # 16 images per size, 3 interleaved rounds
    python benchmarks/bench_decode.py --n-images 8 --rounds 1 --sizes 640x480 --json out.json

Not a test: it prints figures and asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode as T
from torchvision.transforms import RandomResizedCrop

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from dalg.data.device_augment import DeviceAugment  # noqa: E402
from dalg.data.images import load_rgb, load_rgb_for_crop  # noqa: E402
from dalg.data.transforms import CropFirstRandomResizedCrop  # noqa: E402

TRAIN_SIZE = 512
SCALE = (0.08, 1.0)  # conf/data/gldv2.yaml train_scale
RATIO = (3 / 4, 4 / 3)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_jpegs(folder: Path, n: int, w: int, h: int, seed: int = 0) -> list[Path]:
    """Photo-like JPEGs (smooth structure + texture + noise, quality 90) of ``w`` x ``h``."""
    rng = np.random.default_rng(seed)
    paths = []
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        f = rng.uniform(0.002, 0.02, 3)
        base = np.stack([127 + 100 * np.sin(xx * f[c] + yy * f[(c + 1) % 3] + i) for c in range(3)], -1)
        img = base + rng.normal(0, 14, (h, w, 3))
        p = folder / f"{w}x{h}_{i:03d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p, quality=90)
        paths.append(p)
    return paths


def draw_params(sizes: list[tuple[int, int]], seed: int) -> list[tuple]:
    """(crop box (top, left, h, w) in full-size pixels, flip, jitter factors) per image, fixed for all methods."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    out = []
    for w, h in sizes:
        box = RandomResizedCrop.get_params(Image.new("L", (w, h)), list(SCALE), list(RATIO))
        out.append((box, bool(rng.random() < 0.5), tuple(rng.uniform(0.8, 1.2, 3))))
    return out


def augment(img: Image.Image, box, flip: bool, jitter, scale: float = 1.0) -> torch.Tensor:
    """Crop ``box`` (full-size pixels; ``img`` is the image decoded at ``1/scale``) to 512, flip, jitter."""
    top, left, h, w = box
    out = img.resize(
        (TRAIN_SIZE, TRAIN_SIZE),
        Image.Resampling.BICUBIC,
        box=(left / scale, top / scale, (left + w) / scale, (top + h) / scale),
    )
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out = F.adjust_brightness(out, jitter[0])
    out = F.adjust_contrast(out, jitter[1])
    out = F.adjust_saturation(out, jitter[2])
    return F.pil_to_tensor(out)


def _normalise(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_floating_point() else F.normalize(t.float().div_(255), MEAN, STD)


def _scale_of(img: Image.Image, full: tuple[int, int]) -> float:
    return full[0] / img.width


# The data path's worker share (dalg.data.transforms.train_transform): crop-first decoding (dalg.data.jpeg_pixels:
# any libjpeg scale, straight into uint8), the crop resized in torch on uint8, flip -> uint8 tensor; jitter +
# normalisation run on the batch on the device (DeviceAugment). The crop box is the bench's own draw, so that every
# method crops the same box.
_CROP = CropFirstRandomResizedCrop(
    TRAIN_SIZE, scale=SCALE, ratio=RATIO, antialias=True, interpolation=T.BICUBIC
)
_DEVICE = DeviceAugment(0.2, MEAN, STD)


def _data_path_worker(p, full, prm) -> torch.Tensor:
    box, flip, _ = prm
    top, left, h, w = box
    img = load_rgb_for_crop(p, lambda size: (min(h, w), TRAIN_SIZE), pixels=True)  # simplejpeg when it can
    _CROP._plan = (full, box)
    out = _CROP(img)
    return out.flip(-1) if flip else out


def _device_finish(u8: torch.Tensor, prm) -> torch.Tensor:
    """The device's share on this CPU, with the bench's jitter factors in its fixed order (B, C, S)."""
    drawn = (torch.tensor([prm[2]], dtype=torch.float32), torch.tensor([[0, 1, 2]]))
    return _DEVICE(u8[None], drawn=drawn)[0]


def methods() -> dict:
    out = {
        "plain_pil": lambda p, full, prm: augment(load_rgb(p), *prm),
        # what one worker does now (uint8 out; its diff is measured after the device's share)
        "data_path_worker": _data_path_worker,
        # the same plus the device's share run on this CPU core: the data path if the "device" were the CPU
        "data_path_all_cpu": lambda p, full, prm: _device_finish(_data_path_worker(p, full, prm), prm),
        "pil_draft_data_path": lambda p, full, prm: augment(
            load_rgb(p, need_side=TRAIN_SIZE / SCALE[0] ** 0.5), *prm
        ),
        "crop_first_pil": lambda p, full, prm: _crop_first(p, full, prm),
        # not used in the data path: decoded down to half the output side, the crop is then enlarged up to 2x
        "crop_first_pil_upscale2": lambda p, full, prm: _crop_first(p, full, prm, TRAIN_SIZE // 2),
    }
    try:
        import simplejpeg

        def sj(p, full, prm, reduced: bool):
            data = Path(p).read_bytes()
            kw = {}
            if reduced:
                box = prm[0]
                f = _factor(box)
                kw = {"min_height": -(-full[1] // f), "min_width": -(-full[0] // f)}
            arr = simplejpeg.decode_jpeg(data, colorspace="RGB", **kw)
            img = Image.fromarray(arr)
            return augment(img, *prm, scale=full[0] / img.width)

        out["simplejpeg_full"] = lambda p, full, prm: sj(p, full, prm, False)
        out["crop_first_simplejpeg"] = lambda p, full, prm: sj(p, full, prm, True)
    except ImportError:
        pass
    from torchvision.io import decode_jpeg, read_file

    out["torchvision_full"] = lambda p, full, prm: augment(
        F.to_pil_image(decode_jpeg(read_file(str(p)))), *prm
    )
    return out


def _factor(box) -> int:
    _, _, h, w = box
    return next((f for f in (8, 4, 2) if min(h, w) / f >= TRAIN_SIZE), 1)


def _crop_first(p, full, prm, out_side: int = TRAIN_SIZE) -> torch.Tensor:
    box = prm[0]
    img = load_rgb_for_crop(p, lambda size: (min(box[2], box[3]), out_side))
    return augment(img, *prm, scale=_scale_of(img, full))


def run(sizes: list[tuple[int, int]], n: int, rounds: int, log=print) -> dict:
    fns = methods()
    res: dict = {"train_size": TRAIN_SIZE, "scale": SCALE, "n_images": n, "rounds": rounds, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        for w, h in sizes:
            paths = make_jpegs(Path(tmp), n, w, h)
            params = draw_params([(w, h)] * n, seed=w)
            ref = [_normalise(fns["plain_pil"](p, (w, h), prm)) for p, prm in zip(paths, params, strict=True)]
            times: dict[str, list[float]] = {k: [] for k in fns}
            diffs = {}
            for name, fn in fns.items():
                finish = _device_finish if name == "data_path_worker" else lambda t, prm: _normalise(t)
                outs = [finish(fn(p, (w, h), prm), prm) for p, prm in zip(paths, params, strict=True)]
                d = torch.cat([(a - b).abs().flatten() for a, b in zip(outs, ref, strict=True)])
                d = d * torch.tensor(STD).mean() * 255  # back to 8-bit levels (approximately)
                diffs[name] = {"mean": float(d.mean()), "p999": float(torch.quantile(d[::7], 0.999))}
            for _ in range(rounds):  # interleaved: every method sees the same machine load
                for name, fn in fns.items():
                    t0 = time.perf_counter()
                    worker_only = name == "data_path_worker"  # its uint8 output is what the worker hands over
                    for p, prm in zip(paths, params, strict=True):
                        out = fn(p, (w, h), prm)
                        if not worker_only:
                            _normalise(out)
                    times[name].append(time.perf_counter() - t0)
            per_s = {k: n / float(np.median(v)) for k, v in times.items()}
            key = f"{w}x{h}"
            res["sizes"][key] = {"images_per_s": per_s, "diff_to_plain_8bit": diffs}
            log(
                f"  {key}: "
                + ", ".join(f"{k} {v:.1f}/s (diff {diffs[k]['mean']:.2f})" for k, v in per_s.items())
            )
    big = res["sizes"].get("1600x1200")
    if big:
        ips = big["images_per_s"]
        res["winner_1600"] = (
            "data_path_worker"  # what the data path uses (the device does jitter + normalise)
        )
        res["speedup_vs_plain_pil_1600"] = ips["data_path_worker"] / ips["plain_pil"]
        res["speedup_all_on_cpu_1600"] = ips["data_path_all_cpu"] / ips["plain_pil"]
        res["speedup_crop_first_pil_1600"] = ips["crop_first_pil"] / ips["plain_pil"]
        res["speedup_crop_first_upscale2_1600"] = ips["crop_first_pil_upscale2"] / ips["plain_pil"]
        res["gpu_workers_1600"] = workers_needed(ips["data_path_worker"])
    return res


# One GPU training DALG-S (model=dalg_cross) at 512 px, estimated (no GPU measurement in this repository yet):
# 79.5 GFLOPs per image forward at 512x512 (README, `make models`), x3 for forward + backward; an A100's dense
# bf16 peak of 312 TFLOP/s at an assumed 40% model-FLOP utilisation (typical of ViT-S-sized training).
GPU_TRAIN_GFLOP_PER_IMAGE = 3 * 79.5
GPU_ASSUMED_TFLOPS = 0.40 * 312


def workers_needed(images_per_s_per_worker: float) -> dict:
    gpu_rate = GPU_ASSUMED_TFLOPS * 1e3 / GPU_TRAIN_GFLOP_PER_IMAGE
    return {
        "gpu_images_per_s_estimate": gpu_rate,
        "gpu_estimate_basis": "3 x 79.5 GFLOPs/image (dalg_cross @512, fwd+bwd) at 40% of an A100's 312 TFLOP/s bf16",
        "workers_needed": gpu_rate / images_per_s_per_worker,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="640x480,1024x768,1600x1200")
    ap.add_argument("--n-images", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)  # one DataLoader worker
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    res = run(sizes, args.n_images, args.rounds)
    print(json.dumps({k: v for k, v in res.items() if k != "sizes"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
