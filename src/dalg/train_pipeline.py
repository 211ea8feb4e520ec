"""What ``src/train.py`` runs: build data, model, callbacks, loggers and trainer from the config, then fit."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from dalg.lit.module import RetrievalModule
from dalg.retrieval.callback import RetrievalEvalCallback
from dalg.utils.config import save_config
from dalg.utils.tables import print_comparison_table

log = logging.getLogger(__name__)


def _instantiate_all(cfg: DictConfig | None) -> list[Any]:
    return [hydra.utils.instantiate(c) for c in (cfg or {}).values() if c is not None and "_target_" in c]


def build_module(cfg: DictConfig, num_classes: int) -> RetrievalModule:
    return RetrievalModule(model_cfg=OmegaConf.to_container(cfg.model, resolve=True), num_classes=num_classes,
                           **OmegaConf.to_container(cfg.optim, resolve=True),
                           eval_scales=list(cfg.eval_scales) if cfg.get("eval_scales") else None)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit (and evaluate) one configuration; returns ``{"metrics": {...}, "before": {...}, "output_dir": ...}``."""
    pl.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    console = Console()

    datamodule: pl.LightningDataModule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = build_module(cfg, datamodule.num_classes)

    callbacks = _instantiate_all(cfg.get("callbacks"))
    loggers = _instantiate_all(cfg.get("logger"))
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    retrieval = next((c for c in callbacks if isinstance(c, RetrievalEvalCallback)), None)

    save_config(cfg, out_dir)
    label_map = datamodule.save_label_map(out_dir / "checkpoints")
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    before: dict[str, dict[str, float]] = {}
    if cfg.get("validate_before_fit") and retrieval is not None and datamodule.eval_sets:
        console.rule("[bold]untrained model")
        trainer.validate(module, datamodule=datamodule, verbose=False)
        before = {k: v.as_dict() for k, v in retrieval.results.items()}

    console.rule("[bold]training")
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    after = {k: v.as_dict() for k, v in retrieval.results.items()} if retrieval else {}
    if before and after:
        print_comparison_table(before, after, title="untrained vs trained (revisited mAP, %)", console=console)
    if "landmarks_mini" in after:
        console.print("[yellow]landmarks-mini holds real photos with hard changes (day/night, season, thermal); a model "
                      "trained for minutes on synthetic scenes from scratch on a CPU is not expected to do well there. "
                      "Its numbers are reported as they are.")

    ckpt = trainer.checkpoint_callback
    where = {
        "output dir": out_dir,
        "best checkpoint": getattr(ckpt, "best_model_path", "") or "-",
        "last checkpoint": getattr(ckpt, "last_model_path", "") or "-",
        "label map": label_map,
        "resolved config": out_dir / "config.yaml",
        "result grids": getattr(retrieval, "last_grid", None) and Path(retrieval.last_grid).parent,
    }
    for lg in loggers:
        where[f"{type(lg).__name__}"] = getattr(lg, "log_dir", None) or getattr(lg, "save_dir", None)
    console.rule("[bold]outputs")
    for k, v in where.items():
        console.print(f"{k:>18}: {v}")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    return {"metrics": metrics, "before": before, "after": after, "output_dir": str(out_dir)}
