"""Render a model's spatial attention and cross-attention weights over an image as a PNG.

    python src/visualize_attention.py --image photo.jpg [--ckpt run.ckpt | --model dalg_tiny] [--size 224]
                                      [--out outputs/attention/photo_dalg_tiny.png]

With --ckpt (a training checkpoint, read and rebuilt as evaluation does: dalg.lit) the trained network is
shown; without it, a randomly initialised model built from the config `--model` (dalg.create_model).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dalg.data.transforms import EvalTransform
from dalg.factory import create_model
from dalg.models.composer import DALG
from dalg.utils.atomic import atomic_replace


def model_from_config(name: str, **overrides) -> DALG:
    """Random init, as the CLI says (``dalg.create_model``'s overrides)."""
    return create_model(name, pretrained=False, **overrides)


def model_from_checkpoint(path: str | Path) -> DALG:
    """The network of a training checkpoint, with the input config it was trained with: the lit module's one
    safe reader and rebuild (weights only, never retried unsafely; errors name the file)."""
    from dalg.lit.checkpoint_read import read_checkpoint
    from dalg.lit.module import RetrievalModule

    return RetrievalModule.from_checkpoint_dict(read_checkpoint(path), path).net


def _to_image_grid(att: torch.Tensor, stride: int, height: int, width: int) -> np.ndarray:
    """(h, w) token map -> (height, width) pixels; ViT maps cover the patch-padded image, so crop after upsampling."""
    h, w = att.shape
    m = att[None, None].float()
    if h * stride >= height and w * stride >= width:
        m = F.interpolate(m, size=(h * stride, w * stride), mode="bilinear", align_corners=False)
        m = m[..., :height, :width]
    else:
        m = F.interpolate(m, size=(height, width), mode="bilinear", align_corners=False)
    m = m[0, 0]
    m = (m - m.min()) / (m.max() - m.min()).clamp(min=1e-12)
    return m.numpy()


@torch.no_grad()
def attention_maps(model: DALG, image: Image.Image, size: int = 224) -> dict[str, np.ndarray]:
    """Resized RGB image (uint8) and the attention maps in [0, 1] at its resolution."""
    model.eval()
    config = model.input_config  # the model's own normalisation, undone for display
    x = EvalTransform(size, config)(image.convert("RGB"))[None]
    out = model.forward_features(x)
    height, width = x.shape[-2:]
    rgb = (x[0].permute(1, 2, 0) * torch.tensor(config.std) + torch.tensor(config.mean)).clamp(0, 1)
    maps: dict[str, np.ndarray] = {"image": (rgb.numpy() * 255).astype(np.uint8)}
    if out["spatial_attention"] is not None:
        maps["spatial attention"] = _to_image_grid(
            out["spatial_attention"][0, 0], model.stride, height, width
        )
    fa = out["fusion_attention"]
    if fa is not None and out["local"] is not None:
        h, w = out["local"].shape[-2:]
        if fa.shape[2] == 1:  # global query over local tokens: one weight per local token
            maps["cross-attention (g -> local)"] = _to_image_grid(
                fa[0].mean(0)[0].reshape(h, w), model.stride, height, width
            )
        else:  # local queries over [g ; deep tokens]: how much each local token takes from g
            maps["cross-attention (local -> g)"] = _to_image_grid(
                fa[0].mean(0)[:, 0].reshape(h, w), model.stride, height, width
            )
    return maps


def render(maps: dict[str, np.ndarray], out: Path, title: str = "") -> Path:
    """Image + one overlay per map, side by side; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(maps)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.4), squeeze=False)
    for ax, key in zip(axes[0], panels):
        ax.imshow(maps["image"])
        if key != "image":
            ax.imshow(maps[key], cmap="jet", alpha=0.5, vmin=0, vmax=1)
        ax.set_title(key)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        atomic_replace(lambda f: fig.savefig(f, format="png", dpi=100), out)
    finally:
        plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(
        description="Render spatial and cross-attention maps over an image as a PNG."
    )
    ap.add_argument("--image", type=Path, required=True)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--ckpt", type=Path, default=None, help="Lightning checkpoint of a trained model")
    src.add_argument("--model", default="dalg_tiny", help="model config name (random init) when no --ckpt")
    ap.add_argument("--size", type=int, default=224, help="longer side of the resized image, pixels")
    ap.add_argument(
        "--out", type=Path, default=None, help="PNG path (default outputs/attention/<image>_<model>.png)"
    )
    args = ap.parse_args(argv)
    if not args.image.is_file():
        raise SystemExit(f"image not found: {args.image}")
    model = model_from_checkpoint(args.ckpt) if args.ckpt else model_from_config(args.model)
    label = args.ckpt.stem if args.ckpt else f"{args.model} (random init)"
    out = (
        args.out
        or Path("outputs/attention") / f"{args.image.stem}_{args.ckpt.stem if args.ckpt else args.model}.png"
    )
    render(attention_maps(model, Image.open(args.image), args.size), out, title=f"{args.image.name}: {label}")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
