"""Evaluate a checkpoint with the revisited protocol (E/M/H mAP, mP@1/5/10), optionally with +1M distractors.

    python src/eval.py ckpt_path=<run>/checkpoints/last.ckpt [data=roxford5k|rparis6k|landmarks_mini]
        [crop_queries=false] [scales=[0.7071,1.0,1.4142]] [distractors=<feature store>] [ranking.top_k=10000]
        [inference.bf16=true] [test_size=original|512] [scale_resize={mode:bilinear,antialias:false}]

``trainer.validate`` with the evaluation engine's callback (dalg.retrieval.callback: gather, rank, score, table),
as after every training epoch; the Trainer comes from conf/trainer. Writes the results as JSON (``output_json``)
and, beside it, the static results browser ``report/index.html`` (``report_html``, dalg.report).
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig
from rich.console import Console

import dalg.utils.config  # noqa: F401  (registers ${repo_root:})
from dalg import eval_pipeline as pipeline
from dalg.lit.module import RetrievalModule
from dalg.report.browser import check_report_dir, evaluation_browser


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the evaluation described by ``cfg`` (conf/eval.yaml); returns what is written to the JSON."""
    console, ckpt = Console(), str(cfg.ckpt_path)
    features_dir = pipeline.check_outputs(cfg.output_json, cfg.save_features)  # before anything is computed
    report_dir = check_report_dir(cfg.output_json) if cfg.report_html else None
    module = RetrievalModule.for_evaluation(
        ckpt, cfg.scales, cfg.get("inference"), cfg.scale_resize, cfg.get("weights", "auto")
    )
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup_evaluation(module.input_config, cfg.crop_queries, cfg.test_size)
    distractors, whitening = pipeline.ranking_inputs(
        cfg.distractors, cfg.whitening, ckpt, int(module.net.embed_dim), module.weights_source
    )
    extra = {**pipeline.extraction_record(module), "whitening": whitening.describe() if whitening else "off"}
    callback = hydra.utils.instantiate(cfg.callback, distractors=distractors, protocol_extra=extra)
    callback.whitening = whitening  # after instantiate: Hydra would turn the dataclass into a dict
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=[callback])
    trainer.validate(module, datamodule=datamodule, verbose=False)

    report = pipeline.evaluation_report(callback, ckpt, str(module.device))
    pipeline.write_results(report, cfg.output_json, callback, datamodule.eval_sets, features_dir, console)
    if report_dir is not None:  # the static results browser (dalg.report)
        results = list(callback.last_results.values())
        page = evaluation_browser(results, report_dir, module.net, title=callback.title, **cfg.report)
        console.print(f"results browser: {page}")
    return report


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
