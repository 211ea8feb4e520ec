"""ONNX export of the extraction network (behind src/export.py): images -> L2-normalised global descriptors, with
dynamic batch, height and width, checked against PyTorch with onnxruntime.

The graph holds the input normalisation and one forward pass at the size it is given:

    images (B, 3, H, W) float32, RGB in [0, 1]  ->  descriptors (B, D) float32, L2-normalised

Resizing stays outside the graph, as in dalg's evaluation (the longer side to the test size, sides rounded to the
model's size multiple: ``dalg.data.transforms``); a multi-scale model (DOLG: five scales) is run once per scale
and the descriptors averaged and L2-normalised (``dalg.models.multiscale``). The ONNX file's metadata
(``metadata_props["dalg"]``, JSON) records mean/std, interpolation, size multiple, scales and the checkpoint.

Exporting uses ``torch.onnx.export(dynamo=True)`` (torch.export underneath); the window attention has no
shape-dependent Python branch (dalg.models.local_branch), so one graph serves every size. Attention is traced
with PyTorch's math kernel, whose output layout the exported graph reproduces.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dalg.utils.atomic import atomic_replace

INPUT_NAME, OUTPUT_NAME = "images", "descriptors"
METADATA_KEY = "dalg"


class DescriptorGraph(nn.Module):
    """What the ONNX file computes: ``net((images - mean) / std)`` (the network's L2-normalised descriptor), or
    ``net(images)`` when ``normalize_input`` is false (inputs already normalised)."""

    def __init__(
        self, net: nn.Module, mean: Sequence[float], std: Sequence[float], normalize_input: bool = True
    ):
        super().__init__()
        self.net = net
        self.normalize_input = bool(normalize_input)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        x = (images - self.mean) / self.std if self.normalize_input else images
        return self.net(x)


def export_onnx(
    graph: DescriptorGraph,
    path: str | os.PathLike,
    example_size: Sequence[int] = (224, 160),
    example_batch: int = 2,
    opset: int | None = None,
    optimize: bool = True,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Trace ``graph`` on a random ``example_batch x 3 x H x W`` input with dynamic batch, height and width and
    write the ONNX model atomically to ``path``. Choose an example whose sides span more than one attention
    window, with padding, so that nothing is traced in a degenerate case (the defaults do for dalg's models)."""
    from torch.export import Dim
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if example_batch < 2:
        raise ValueError(f"example_batch must be >= 2 (a batch of 1 may be specialised), got {example_batch}")
    h, w = (int(s) for s in example_size)
    graph = graph.eval()
    x = torch.rand(example_batch, 3, h, w, generator=torch.Generator().manual_seed(0))
    dynamic = {INPUT_NAME: {0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC}}
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # one INFO line per deduplicated initializer
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        program = torch.onnx.export(
            graph,
            (x,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=dynamic,
            opset_version=opset,
            optimize=optimize,
            verbose=False,
        )
    model = program.model_proto
    if metadata:
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(dict(metadata), default=str)
    path = Path(os.path.expanduser(str(path)))
    atomic_replace(lambda f: f.write(model.SerializeToString()), path)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``dalg`` metadata of an exported file ({} when absent)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for entry in model.metadata_props:
        if entry.key == METADATA_KEY:
            return json.loads(entry.value)
    return {}


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session for ``path`` (warnings about constant folding silenced)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = int(threads)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_parity(
    path: str | os.PathLike,
    graph: DescriptorGraph,
    sizes: Sequence[Sequence[int]],
    batch: int = 2,
    min_cosine: float = 0.9999,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Run the ONNX file (onnxruntime) and ``graph`` (PyTorch) on random images of every ``(H, W)`` in ``sizes``;
    returns one row per size (the lowest cosine over the batch, the largest absolute difference) and raises
    ``ValueError`` naming the file and sizes where a cosine is below ``min_cosine``."""
    session = onnx_session(path)
    gen = torch.Generator().manual_seed(seed)
    rows, bad = [], []
    graph = graph.eval()
    for size in sizes:
        h, w = (int(s) for s in size)
        x = torch.rand(batch, 3, h, w, generator=gen)
        with torch.no_grad():
            ref = graph(x).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        if got.shape != ref.shape:
            raise ValueError(
                f"{path}: output {got.shape} for input {tuple(x.shape)}, PyTorch gives {ref.shape}"
            )
        cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12)
        row = {
            "size": [h, w],
            "batch": batch,
            "min_cosine": float(cos.min()),
            "max_abs_diff": float(np.abs(got - ref).max()),
        }
        rows.append(row)
        if not row["min_cosine"] >= min_cosine:
            bad.append(f"{h}x{w}: cosine {row['min_cosine']:.6f}")
    if bad:
        raise ValueError(f"{path}: ONNX and PyTorch descriptors differ (< {min_cosine}) at {'; '.join(bad)}")
    return rows
