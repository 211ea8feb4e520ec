"""Evaluate a checkpoint with the revisited protocol (E/M/H mAP, mP@1/5/10), optionally with +1M distractors.

    python src/eval.py ckpt_path=<run>/checkpoints/last.ckpt [data=roxford5k|rparis6k|landmarks_mini]
        [crop_queries=false] [scales=[0.7071,1.0,1.4142]] [distractors=<feature store>] [ranking.top_k=10000]
        [inference.bf16=true] [inference.compile=true] [test_size=original|512]
        [scale_resize={mode:bilinear,antialias:false}]

Descriptors come from the model's own ``validation_step`` (``trainer.validate``, the same path as the training
callback), through ``dalg.inference`` with the ``inference`` options (conf/inference, float32 by default); ranking
and scoring from ``dalg.retrieval.evaluation.rank_and_score``. Prints the table, writes it as JSON
(``output_json``) with the protocol options used, and says where.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console

import dalg.utils.config  # noqa: F401  (registers ${repo_root:})
from dalg.data.transforms import describe_test_size, parse_test_size
from dalg.lit.module import RetrievalModule
from dalg.retrieval.callback import DescriptorBuffer
from dalg.retrieval.evaluation import RankingOptions, rank_and_score
from dalg.retrieval.features import load_features, save_features
from dalg.retrieval.metrics import format_table
from dalg.retrieval.torchmetric import assemble_by_index
from dalg.utils.atomic import write_json_atomic
from dalg.utils.tables import print_scores_table
from dalg.utils.writable import check_writable_dir, check_writable_file

# rows of a distractor store whose norm is checked at start (evenly spaced), and the tolerance (float16 rows)
DISTRACTOR_NORM_SAMPLE = 4096
DISTRACTOR_NORM_TOL = 1e-2


class DescriptorCollector(pl.Callback):
    """Keeps the ``(index, descriptors)`` that ``validation_step`` returns, per dataloader (= evaluation set)."""

    def __init__(self) -> None:
        self.buffer = DescriptorBuffer()

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ):
        self.buffer.add(outputs, dataloader_idx)

    def features(self, dataloader_idx: int, n: int) -> np.ndarray:
        if not self.buffer.has(dataloader_idx):
            raise RuntimeError(f"no descriptors were extracted for evaluation set {dataloader_idx}")
        return assemble_by_index(*self.buffer.tensors(dataloader_idx), n)


def check_distractors(features: np.ndarray, dim: int, path: object) -> None:
    """A distractor store must match the model's descriptor size and hold L2-normalised rows (inner product =
    cosine); checked on evenly spaced rows before any extraction."""
    if features.ndim != 2 or features.shape[1] != dim:
        got = f"{features.shape[1]}-d" if features.ndim == 2 else f"of shape {features.shape}"
        raise ValueError(
            f"distractors={path}: descriptors are {got}, the model gives {dim}-d; "
            f"extract them with this checkpoint (src/extract.py)"
        )
    rows = np.unique(
        np.linspace(0, len(features) - 1, min(len(features), DISTRACTOR_NORM_SAMPLE)).astype(np.int64)
    )
    norms = np.linalg.norm(np.asarray(features[rows], dtype=np.float32), axis=1)
    bad = ~(np.abs(norms - 1.0) <= DISTRACTOR_NORM_TOL)  # NaN counts as bad
    if bad.any():
        raise ValueError(
            f"distractors={path}: {int(bad.sum())} of {len(rows)} checked rows are not L2-normalised "
            f"(norms e.g. {[round(float(n), 4) for n in norms[bad][:3]]}, row {int(rows[bad][0])}); "
            f"the ranking needs unit vectors"
        )


def resize_record(module: RetrievalModule) -> dict[str, Any]:
    """How images reached the network, for the protocol record: the input config (mean/std, interpolation, sides
    rounded to multiples of size_multiple) and the per-scale resize rule."""
    return {"input": module.input_config.to_dict(), "scale_resize": module.net.scale_resize.to_dict()}


def _effective_scales(module: RetrievalModule) -> list[float]:
    scales = module.eval_scales if module.eval_scales else getattr(module.net, "scales", None)
    return [float(s) for s in scales] if scales else [1.0]


def _nan_to_none(values: np.ndarray) -> list[float | None]:
    return [None if math.isnan(float(v)) else float(v) for v in values]


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the evaluation described by ``cfg`` (conf/eval.yaml); returns what is written to the JSON."""
    console = Console()
    # every output location is checked before any extraction: a long evaluation never ends in a failed write
    check_writable_file(cfg.output_json, "output_json")
    if cfg.get("save_features"):
        check_writable_dir(Path(cfg.output_json).parent / "features", "save_features")
    options = RankingOptions.from_mapping(OmegaConf.to_container(cfg.ranking, resolve=True))
    module = RetrievalModule.for_evaluation(
        cfg.ckpt_path, cfg.get("scales"), cfg.get("inference"), cfg.get("scale_resize")
    )
    scales = _effective_scales(module)

    with open_dict(cfg):  # the evaluation options apply to every set of the data config
        cfg.data.eval_batch_size = int(cfg.batch_size)
        cfg.data.num_workers = int(cfg.num_workers)
        for spec in cfg.data.eval_sets.values():
            spec.crop_queries = bool(cfg.crop_queries)
            spec.required = True  # asked for explicitly: a missing set is an error, not a skip
            if cfg.get("test_size") is not None:  # "original" -> null: each image's own size
                spec.test_size = parse_test_size(cfg.test_size, "test_size")
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.set_input_config(
        module.input_config
    )  # the checkpoint's normalisation, interpolation, multiple
    datamodule.setup("validate")  # evaluation sets only: no training set is read
    if not datamodule.eval_sets:
        raise ValueError(f"data config {cfg.data.get('_target_')} defines no evaluation set (data.eval_sets)")

    distractors = None
    if cfg.get("distractors"):
        store = load_features(os.path.expanduser(str(cfg.distractors)))
        distractors = store.features
        check_distractors(distractors, int(module.net.embed_dim), cfg.distractors)  # before any extraction
        console.print(
            f"distractors: {len(store):,} x {distractors.shape[1]} ({distractors.dtype}) from {cfg.distractors}"
        )

    collector = DescriptorCollector()
    trainer = pl.Trainer(
        accelerator=cfg.accelerator,
        devices=1,
        precision=cfg.precision,
        logger=False,
        enable_checkpointing=False,
        callbacks=[collector],
        enable_model_summary=False,
    )
    t0 = time.perf_counter()
    trainer.validate(module, datamodule=datamodule, verbose=False)
    seconds = time.perf_counter() - t0
    n_images = sum(len(s.dataset) for s in datamodule.eval_sets)

    out_dir = Path(cfg.output_json).parent
    # decoding and resizing included (the DataLoader's workers), ranking not: what a researcher waits for per set
    extraction = {
        "images": n_images,
        "seconds": round(seconds, 3),
        "images_per_s": n_images / seconds,
        "inference": module.inference_label,
        "device": str(module.device),
    }
    results, protocol_text, report = (
        {},
        {},
        {"checkpoint": str(cfg.ckpt_path), "extraction": extraction, "sets": {}},
    )
    for i, eval_set in enumerate(datamodule.eval_sets):
        feats = collector.features(i, len(eval_set.dataset))
        nq = eval_set.gt.n_queries
        if distractors is not None and distractors.shape[1] != feats.shape[1]:
            raise ValueError(
                f"distractor features {cfg.distractors} are {distractors.shape[1]}-d, the model gives {feats.shape[1]}-d"
            )
        scores, _, protocol = rank_and_score(
            feats[:nq], feats[nq:], eval_set.gt.gnd, distractors, options, cfg.kappas
        )
        protocol.update(
            crop_queries=eval_set.crop_queries,
            test_size=describe_test_size(eval_set.test_size),
            scales=scales,
            inference=module.inference_label,
            **resize_record(module),
        )
        results[eval_set.name] = scores
        protocol_text[eval_set.name] = (
            f"crop={'on' if eval_set.crop_queries else 'OFF'}, size={protocol['test_size']}, scales={scales}, "
            f"{protocol['inference']}, "
            f"{protocol['ranking']} of {protocol['database']:,}"
            + (f"+{protocol['distractors']:,} distractors" if protocol["distractors"] else "")
            + f", rerank {protocol['rerank']}"
        )
        report["sets"][eval_set.name] = {
            "scores": scores.as_dict(),
            "truncated": scores.truncated,
            "protocol": protocol,
            "n_queries": nq,
            "per_query_ap": {s: _nan_to_none(v) for s, v in scores.aps.items()},
        }
        if cfg.get("save_features"):
            save_features(
                out_dir / "features" / f"{eval_set.name}_queries",
                feats[:nq],
                eval_set.gt.qimlist,
                meta={"checkpoint": str(cfg.ckpt_path), "protocol": protocol},
            )
            save_features(
                out_dir / "features" / f"{eval_set.name}_database",
                feats[nq:],
                eval_set.gt.imlist,
                meta={"checkpoint": str(cfg.ckpt_path), "protocol": protocol},
            )

    if {1, 5, 10} <= {int(k) for k in cfg.kappas}:
        print_scores_table(
            results, title=f"revisited protocol: {cfg.ckpt_path}", options=protocol_text, console=console
        )
    else:  # the rich table has the standard mP@1/5/10 columns; other kappas get the plain table
        for name, scores in results.items():
            console.print(format_table(scores, title=f"{name}: {protocol_text[name]}"))
    if any(s.truncated for s in results.values()):
        console.print(
            "[yellow]truncated top-k ranking: positives outside the top-k count as misses (protocol.md)"
        )
    console.print(
        f"extraction: {n_images:,} images in {seconds:.1f} s = {n_images / seconds:.1f} images/s "
        f"({extraction['inference']}, {extraction['device']}, decoding included)"
    )
    out = Path(cfg.output_json)
    write_json_atomic(report, out)
    console.print(f"results JSON: {out}")
    if cfg.get("save_features"):
        console.print(f"feature stores: {out_dir / 'features'}")
    return report


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
