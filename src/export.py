"""Export a checkpoint's extraction network (image -> L2-normalised global descriptor) for use outside PyTorch.

    python src/export.py ckpt_path=<run>/checkpoints/last.ckpt format=onnx [output=model.onnx]

Writes an ONNX model with dynamic batch, height and width (dalg.tools.onnx_export): input ``images``
(B, 3, H, W) float32 RGB in [0, 1], output ``descriptors`` (B, D). Before the file is moved into place,
onnxruntime and PyTorch are run on the ``check.sizes`` of conf/export.yaml and every descriptor must agree to
cosine ``check.min_cosine``; the table is printed, and the file's ``dalg`` metadata names the checkpoint (sha256),
the input normalisation, size multiple and test scales.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

import dalg.utils.config  # noqa: F401  (registers ${repo_root:})
from dalg.lit.module import RetrievalModule
from dalg.tools.onnx_export import DescriptorGraph, check_parity, export_onnx
from dalg.utils.run_metadata import file_sha256
from dalg.utils.writable import check_writable_file

FORMATS = ("onnx",)


def export(cfg: DictConfig) -> Path:
    """Run the export described by ``cfg`` (conf/export.yaml); returns the written file."""
    console = Console()
    if cfg.format not in FORMATS:
        raise ValueError(f"format={cfg.format!r} is not supported; choose one of {list(FORMATS)}")
    out = check_writable_file(cfg.output, "output")
    ckpt = Path(os.path.expanduser(str(cfg.ckpt_path)))
    # float32 network, eval mode; the EMA average by default when the run kept one (weights=auto)
    module = RetrievalModule.for_evaluation(ckpt, weights=cfg.get("weights", "auto"))
    net = module.net
    net.head = None  # the margin head is training-only; it would only add unused weights
    config = module.input_config
    graph = DescriptorGraph(net, config.mean, config.std, bool(cfg.normalize_input))
    metadata = {
        "checkpoint": str(ckpt),
        "checkpoint_sha256": file_sha256(ckpt),
        "weights": module.weights_source,
        "input": {
            "layout": "NCHW float32, RGB",
            "range": "[0, 1]" if cfg.normalize_input else "normalised with mean/std",
            **config.to_dict(),
        },
        "output": {"name": "descriptors", "dim": int(net.embed_dim), "l2_normalised": True},
        "scales": [float(s) for s in getattr(net, "scales", (1.0,))],
        "scale_resize": net.scale_resize.to_dict(),
    }
    unchecked = out.with_name(f".{out.name}.unchecked")
    t0 = time.perf_counter()
    export_onnx(
        graph,
        unchecked,
        example_size=list(cfg.example_size),
        example_batch=int(cfg.example_batch),
        opset=cfg.opset,
        optimize=bool(cfg.optimize),
        metadata=metadata,
    )
    seconds = time.perf_counter() - t0
    sizes = OmegaConf.to_container(cfg.check.sizes, resolve=True)
    try:
        rows = check_parity(
            unchecked, graph, sizes, batch=int(cfg.check.batch), min_cosine=float(cfg.check.min_cosine)
        )
    except ValueError as e:
        raise ValueError(f"{e}; the unchecked export is left at {unchecked}") from e
    os.replace(unchecked, out)

    table = Table(title=f"ONNX (onnxruntime) vs PyTorch: {ckpt}")
    for col in ("input (B x H x W)", "min cosine", "max |diff|"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            f"{r['batch']} x {r['size'][0]} x {r['size'][1]}",
            f"{r['min_cosine']:.7f}",
            f"{r['max_abs_diff']:.2e}",
        )
    console.print(table)
    scales = metadata["scales"]
    if scales != [1.0]:
        console.print(
            f"multi-scale model (scales {scales}): run the ONNX model once per scale on the resized image, "
            f"average the descriptors and L2-normalise (as dalg.models.multiscale)"
        )
    size_mb = out.stat().st_size / 2**20
    console.print(f"ONNX model: {out} ({size_mb:.1f} MiB, exported in {seconds:.1f} s)")
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
