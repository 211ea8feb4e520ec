"""What ``src/eval.py`` and ``src/extract.py`` share around the evaluation engine: how a checkpoint extracts
descriptors (for protocol records and store fingerprints), the output checks and the results of an evaluation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from dalg.lit.module import RetrievalModule
from dalg.retrieval.callback import RetrievalEvalCallback
from dalg.retrieval.features import load_distractors, save_features
from dalg.retrieval.whitening import Whitening, load_whitening, whiten_descriptors
from dalg.utils.atomic import write_json_atomic
from dalg.utils.run_metadata import file_sha256
from dalg.utils.writable import check_writable_dir, check_writable_file


def test_scales(module: RetrievalModule) -> list[float]:
    """The scales descriptors are extracted at (``RetrievalModule.test_scales``: the one fallback)."""
    return list(module.test_scales)


def extraction_record(module: RetrievalModule) -> dict[str, Any]:
    """How images reached the network and became descriptors: the test scales, the inference options, the input
    config (mean/std, interpolation, sides rounded to multiples of size_multiple) and the per-scale resize rule."""
    return {
        "scales": test_scales(module),
        "inference": module.inference_label,
        "weights": module.weights_source,  # raw, or the EMA average the run validated
        "input": module.input_config.to_dict(),
        "scale_resize": module.net.scale_resize.to_dict(),
    }


def check_outputs(output_json: str | Path, save_features: bool) -> Path | None:
    """Every output location of an evaluation, checked before any extraction (a long evaluation never ends in a
    failed write); returns the feature stores' folder with ``save_features``."""
    check_writable_file(output_json, "output_json")
    if not save_features:
        return None
    return check_writable_dir(Path(output_json).parent / "features", "save_features")


def ranking_inputs(
    distractors: str | None, whitening: str | None, checkpoint: str, dim: int, weights: str | None = None
) -> tuple[np.ndarray | None, Whitening | None]:
    """The distractor descriptors and the whitening of an evaluation, each checked against the model (size,
    checkpoint, ``weights``: raw or ema) before any extraction; the distractors come whitened (once, not per set)."""
    rows = white = None
    if distractors or whitening:  # the checkpoint hashed once for both checks
        ckpt = Path(os.path.expanduser(str(checkpoint)))
        sha = file_sha256(ckpt)
        if distractors:
            rows = load_distractors(distractors, dim, sha, weights)
        if whitening:
            white = load_whitening(whitening)
            white.check_applies(dim, sha, f"the descriptors of {ckpt}", weights)
    if white is not None and rows is not None:
        rows = whiten_descriptors(rows, white, "distractors")
    return rows, white


def evaluation_report(callback: RetrievalEvalCallback, checkpoint: str, device: str) -> dict[str, Any]:
    """The results JSON: the checkpoint, the extraction's speed and every set's scores, protocol and per-query AP."""
    done = callback.last_extraction or {"images": 0, "seconds": 0.0}
    seconds = max(float(done["seconds"]), 1e-9)
    extraction = {
        "images": int(done["images"]),
        "seconds": round(seconds, 3),
        "images_per_s": done["images"] / seconds,
        "inference": callback.protocol_extra.get("inference"),
        "device": device,
    }
    sets = {name: result.to_json() for name, result in callback.last_results.items()}
    return {"checkpoint": checkpoint, "extraction": extraction, "sets": sets}


def write_results(
    report: dict[str, Any],
    output_json: str | Path,
    callback: RetrievalEvalCallback,
    eval_sets: list,
    features_dir: Path | None,
    console: Console,
) -> None:
    """The results JSON, and with ``features_dir`` each set's descriptors as feature stores; says where."""
    ex = report["extraction"]
    console.print(
        f"extraction: {ex['images']:,} images in {ex['seconds']:.1f} s = {ex['images_per_s']:.1f} images/s "
        f"({ex['inference']}, {ex['device']}, decoding included)"
    )
    console.print(f"results JSON: {write_json_atomic(report, output_json)}")
    if features_dir is not None:
        save_set_features(callback, eval_sets, features_dir, report["checkpoint"])
        console.print(f"feature stores: {features_dir}")


def save_set_features(
    callback: RetrievalEvalCallback, eval_sets: list, directory: Path, checkpoint: str
) -> None:
    """Each set's query and database descriptors as feature stores ``<directory>/<set>_{queries,database}``,
    rows named as in the set's ground truth."""
    for eval_set in eval_sets:
        result = callback.last_results[eval_set.name]
        feats, nq = callback.features[eval_set.name], result.n_queries
        meta = {"checkpoint": checkpoint, "protocol": result.protocol}
        for part, rows, names in (
            ("queries", feats[:nq], eval_set.gt.qimlist),
            ("database", feats[nq:], eval_set.gt.imlist),
        ):
            save_features(directory / f"{eval_set.name}_{part}", rows, names, meta=meta)
