"""Evaluate a checkpoint with the revisited protocol (E/M/H mAP, mP@1/5/10), optionally with +1M distractors.

    python src/eval.py ckpt_path=<run>/checkpoints/last.ckpt [data=roxford5k|rparis6k|landmarks_mini]
        [crop_queries=false] [scales=[0.7071,1.0,1.4142]] [distractors=<feature store>] [ranking.top_k=10000]
        [inference.bf16=true] [test_size=original|512] [scale_resize={mode:bilinear,antialias:false}]

``trainer.validate`` with the evaluation engine's callback (dalg.retrieval.callback: gather, rank, score, table),
as after every training epoch; the Trainer comes from conf/trainer. Writes the results as JSON (``output_json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig
from rich.console import Console

import dalg.utils.config  # noqa: F401  (registers ${repo_root:})
from dalg.eval_pipeline import evaluation_report, extraction_record, print_extraction, save_set_features
from dalg.lit.module import RetrievalModule
from dalg.retrieval.features import load_distractors
from dalg.utils.atomic import write_json_atomic
from dalg.utils.writable import check_writable_dir, check_writable_file


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the evaluation described by ``cfg`` (conf/eval.yaml); returns what is written to the JSON."""
    console, ckpt, features_dir = Console(), str(cfg.ckpt_path), Path(cfg.output_json).parent / "features"
    # every output and input is checked before any extraction: a long evaluation never ends in a failed write
    check_writable_file(cfg.output_json, "output_json")
    if cfg.save_features:
        check_writable_dir(features_dir, "save_features")
    module = RetrievalModule.for_evaluation(ckpt, cfg.scales, cfg.get("inference"), cfg.scale_resize)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup_evaluation(module.input_config, cfg.crop_queries, cfg.test_size)
    distractors = load_distractors(cfg.distractors, int(module.net.embed_dim)) if cfg.distractors else None
    callback = hydra.utils.instantiate(
        cfg.callback, distractors=distractors, protocol_extra=extraction_record(module)
    )
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=[callback])
    trainer.validate(module, datamodule=datamodule, verbose=False)

    report = evaluation_report(callback, ckpt, str(module.device))
    print_extraction(report, console)
    console.print(f"results JSON: {write_json_atomic(report, cfg.output_json)}")
    if cfg.save_features:
        save_set_features(callback, datamodule.eval_sets, features_dir, ckpt)
        console.print(f"feature stores: {features_dir}")
    return report


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
