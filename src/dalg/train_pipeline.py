"""What ``src/train.py`` runs: check the config, build data, model, callbacks, loggers and trainer, then fit.

Resume rule (``resume: auto``, the default): when ``ckpt_path`` is null and ``<output_dir>/checkpoints/last.ckpt``
exists, training continues from it. With the default timestamped run folder that never happens; set ``run_name=<x>``
(run folder ``<log_dir>/<task>/runs/<x>``, or a stable multirun folder ``<log_dir>/<task>/multiruns/<x>``) and the
same command started again continues where the killed run stopped, mid-epoch included (steps, optimiser, scheduler,
EMA and the data order; see ``dalg.lit.resumable_data``).
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only
from rich.console import Console

from dalg.lit.checkpoint_read import checkpoint_step
from dalg.lit.csv_logger import ResumableCSVLogger
from dalg.lit.ema import EMAWeights
from dalg.lit.last_checkpoint import LastCheckpoint
from dalg.lit.module import RetrievalModule
from dalg.lit.resumable_data import ResumableLoader
from dalg.lit.resume_check import check_resume_model
from dalg.lit.validation_history import ValidationHistory
from dalg.lit.wandb_logging import wandb_run_args
from dalg.retrieval.callback import RetrievalEvalCallback
from dalg.sweeps.job_names import current_job
from dalg.utils.atomic import write_json_atomic
from dalg.utils.config import save_config
from dalg.utils.config_checks import check_before_data, check_image_sizes, check_training_batches
from dalg.utils.lock import exclusive_lock
from dalg.utils.run_metadata import run_metadata
from dalg.utils.tables import print_comparison_table
from dalg.utils.transcript import transcript

log = logging.getLogger(__name__)


def _instantiate_all(cfg: DictConfig | None) -> list[Any]:
    return [hydra.utils.instantiate(c) for c in (cfg or {}).values() if c is not None and "_target_" in c]


def instantiate_loggers(cfg: DictConfig, job: dict[str, Any]) -> list[Any]:
    """``cfg.logger``'s loggers; a W&B logger's unset name / group / tags / job_type come from the run and its
    sweep (:func:`dalg.lit.wandb_logging.wandb_run_args`)."""
    loggers = []
    for c in (cfg.get("logger") or {}).values():
        if c is None or "_target_" not in c:
            continue
        extra: dict[str, Any] = {}
        if issubclass(hydra.utils.get_class(c._target_), WandbLogger):
            auto = wandb_run_args(str(cfg.run_name), str(cfg.task_name), job)
            extra = {k: v for k, v in auto.items() if c.get(k) in (None, "")}
        loggers.append(hydra.utils.instantiate(c, **extra))
    return loggers


def landmarks_mini_hint(cfg: DictConfig, evaluated: Any) -> str | None:
    """The closing remark on landmarks-mini's numbers, only when it applies: the model was trained on the
    generated synthetic scenes (``data.generator``) and landmarks-mini was evaluated."""
    if "landmarks_mini" not in evaluated or cfg.data.get("generator") is None:
        return None
    scratch = not OmegaConf.select(cfg, "model.backbone.pretrained", default=False) and not OmegaConf.select(
        cfg, "model.backbone.weights", default=None
    )
    return (
        "landmarks-mini holds real photos with hard changes (day/night, season, thermal); a model trained on "
        f"synthetic scenes only{' from scratch' if scratch else ''} is not expected to do well there. "
        "Its numbers are reported as they are."
    )


def objective(result: dict[str, Any], metric: str | None) -> float | None:
    """What Hydra sweepers (Optuna) maximise: ``metric`` at the best validation (the best checkpoint's), the last
    value when no validation during training recorded it."""
    if not metric:
        return None
    best = (result.get("best") or {}).get("metrics") or {}
    value = best.get(metric, result["metrics"].get(metric))
    return float(value) if value is not None else None


def _entry(entry: dict[str, Any] | None, **extra: Any) -> dict[str, Any] | None:
    return (
        {"step": entry["step"], "epoch": entry["epoch"], **extra, "metrics": entry["metrics"]}
        if entry
        else None
    )


def build_module(cfg: DictConfig, num_classes: int) -> RetrievalModule:
    return RetrievalModule(
        model_cfg=OmegaConf.to_container(cfg.model, resolve=True),
        num_classes=num_classes,
        **OmegaConf.to_container(cfg.optim, resolve=True),
        eval_scales=list(cfg.eval_scales) if cfg.get("eval_scales") else None,
    )


def resume_checkpoint(cfg: DictConfig, out_dir: Path) -> str | None:
    """``ckpt_path`` if given; else, with ``resume=auto``, this run folder's ``checkpoints/last.ckpt`` if present."""
    if cfg.get("ckpt_path"):
        return str(cfg.ckpt_path)
    last = out_dir / "checkpoints" / "last.ckpt"
    if cfg.get("resume", "auto") == "auto" and last.is_file():
        return str(last)
    return None


def make_train_loader_resumable(
    datamodule: pl.LightningDataModule, trainer_ref: list[pl.Trainer], seed: int
) -> None:
    """Wrap the datamodule's training loader (same dataset, batch size, workers) in a ``ResumableLoader``."""
    original = datamodule.train_dataloader

    def consumed() -> int:
        # batches of the current epoch that went through training_step (the loader itself prefetches ahead)
        return trainer_ref[0].fit_loop.epoch_loop.batch_progress.current.processed if trainer_ref else 0

    def train_dataloader() -> ResumableLoader:
        return ResumableLoader.wrap(original(), seed=seed, consumed_batches=consumed)

    datamodule.train_dataloader = train_dataloader  # type: ignore[method-assign]


@rank_zero_only
def _save_run_files(
    cfg: DictConfig, out_dir: Path, datamodule: Any, loggers: list, resumed_from: str | None, job: dict
) -> dict[str, Any]:
    save_config(cfg, out_dir)
    meta = run_metadata(datamodule, {"resumed_from": resumed_from, "job": job})
    name = (
        "run_meta.json"
        if resumed_from is None
        else f"run_meta.resume{len(list(out_dir.glob('run_meta*.json')))}.json"
    )
    write_json_atomic(meta, out_dir / name)
    for lg in loggers:
        lg.log_hyperparams(
            {
                **OmegaConf.to_container(cfg, resolve=True),
                "run": {
                    "job": job,
                    "git": meta["git"],
                    "data_sha256": meta["data"]["sha256"],
                    "resumed_from": resumed_from,
                },
            }
        )
    return meta


def _finish_wandb(loggers: list) -> None:
    """Close the W&B run, so the next job of a multirun in this process starts its own (Lightning leaves it open)."""
    for lg in loggers:
        if isinstance(lg, WandbLogger) and getattr(lg, "_experiment", None) is not None:
            lg.experiment.finish()


def _launching_process() -> bool:
    """Global rank 0 of the job: the process that holds the run-folder lock. DDP ranks that Lightning starts (env
    LOCAL_RANK), torchrun/SLURM start (RANK, SLURM_PROCID) and other nodes' launchers (NODE_RANK) run train() too."""
    return (getattr(rank_zero_only, "rank", 0) or 0) == 0 and int(os.environ.get("NODE_RANK") or 0) == 0


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit (and evaluate) one configuration; returns ``{"metrics": {...}, "before": {...}, "output_dir": ...}``.

    The run folder is locked while the run lasts (``<output_dir>/run.lock``, dalg.utils.lock): a second run with
    the same ``run_name`` is refused at once, naming the pid of the one that runs; a killed run's lock does not
    block."""
    out_dir = Path(cfg.paths.output_dir)
    lock = (
        exclusive_lock(out_dir / "run.lock", f"run folder {out_dir}")
        if _launching_process()
        else nullcontext()
    )
    with lock:
        if not _launching_process():
            return _train(cfg)
        with transcript(out_dir / "train.log"):  # the console, tables included, beside Hydra's log records
            return _train(cfg)


def _train(cfg: DictConfig) -> dict[str, Any]:
    started = time.time()
    check_before_data(cfg)  # config errors fail here, before any data is read
    pl.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    console = Console()
    ckpt_path = resume_checkpoint(cfg, out_dir)
    # read safely (weights_only) before any data is read: a bad or hostile file fails here, naming itself
    resume_step = checkpoint_step(ckpt_path) if ckpt_path else None
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)

    datamodule: pl.LightningDataModule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    trainer_ref: list[pl.Trainer] = []
    make_train_loader_resumable(datamodule, trainer_ref, cfg.seed)
    module = build_module(cfg, datamodule.num_classes)
    check_image_sizes(cfg, module.net.stride)
    # the data was listed before the model existed (it needs num_classes): now every transform gets the
    # model's normalisation, interpolation and size multiple, before any loader is made
    datamodule.set_input_config(module.input_config)
    log.info("input: %s (%s)", module.input_config.describe(), module.input_config.source)

    if ckpt_path:  # before anything is written: a checkpoint of another model must not rewrite config.yaml
        check_resume_model(ckpt_path, module)
    callbacks = _instantiate_all(cfg.get("callbacks"))
    # every validation's metrics and the best one, by the checkpoint's monitor: metrics.json, Optuna, W&B best/
    history = next((c for c in callbacks if isinstance(c, ValidationHistory)), None)
    if history is None:
        history = ValidationHistory()
        callbacks.append(history)
    job = current_job()
    loggers = instantiate_loggers(cfg, job)
    # the full config goes to the loggers once (_save_run_files); not a second, flat copy of the module's hparams
    module._log_hyperparams = False
    for lg in loggers:
        if isinstance(lg, ResumableCSVLogger):
            lg.resume_step = resume_step
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    trainer_ref.append(trainer)
    if (
        getattr(datamodule, "train_set", None) is not None
    ):  # before any step and any run file: no silent empty job
        check_training_batches(len(datamodule.train_set), int(cfg.data.batch_size), trainer.world_size)
    retrieval = next((c for c in callbacks if isinstance(c, RetrievalEvalCallback)), None)

    _save_run_files(cfg, out_dir, datamodule, loggers, ckpt_path, job)
    label_map = rank_zero_only(datamodule.save_label_map)(out_dir / "checkpoints")

    before: dict[str, dict[str, float]] = {}
    if (
        cfg.get("validate_before_fit")
        and ckpt_path is None
        and retrieval is not None
        and datamodule.eval_sets
    ):
        console.rule("[bold]untrained model")
        trainer.validate(module, datamodule=datamodule, verbose=False)
        before = {k: v.as_dict() for k, v in retrieval.results.items()}

    console.rule(f"[bold]training (resuming from {ckpt_path})" if ckpt_path else "[bold]training")
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if ckpt_path and trainer.global_step == resume_step and retrieval is not None and not retrieval.results:
        # the checkpoint was already at the end of training: evaluate it, so a re-run still reports its metrics
        console.rule("[bold]nothing left to train: evaluating the checkpoint")
        trainer.validate(module, datamodule=datamodule, verbose=False)

    after = {k: v.as_dict() for k, v in retrieval.results.items()} if retrieval else {}
    if before and after and trainer.is_global_zero:
        print_comparison_table(
            before, after, title="untrained vs trained (revisited mAP, %)", console=console
        )
    hint = landmarks_mini_hint(cfg, after)
    if hint and trainer.is_global_zero:
        console.print(f"[yellow]{hint}")

    ckpt = next((c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)), None)
    last_path = next(
        (c.last_model_path for c in trainer.checkpoint_callbacks if isinstance(c, LastCheckpoint)), ""
    )
    where = {
        "output dir": out_dir,
        "best checkpoint": getattr(ckpt, "best_model_path", "") or "-",
        "last checkpoint": last_path or "-",
        "label map": label_map,
        "resolved config": out_dir / "config.yaml",
        "run metadata": out_dir / "run_meta.json",
        "final metrics": out_dir / "metrics.json",
        "transcript": out_dir / "train.log",
        "result grids": getattr(retrieval, "last_grid", None) and Path(retrieval.last_grid).parent,
    }
    if any(isinstance(c, EMAWeights) for c in trainer.callbacks):
        # what the EMA docstring promises: which weights the files hold, and which ones evaluation takes
        where["checkpoint weights"] = (
            "raw (resume) + the EMA average the validations used (eval: weights=auto)"
        )
    for lg in loggers:
        where[f"{type(lg).__name__}"] = getattr(lg, "log_dir", None) or getattr(lg, "save_dir", None)
    if trainer.is_global_zero:
        console.rule("[bold]outputs")
        for k, v in where.items():
            console.print(f"{k:>18}: {v}")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    best = _entry(
        history.best,
        value=history.best["metrics"].get(history.monitor) if history.best else None,
        checkpoint=getattr(ckpt, "best_model_path", None) or None,
    )
    last = _entry(history.last, checkpoint=last_path or None)
    if trainer.is_global_zero and best and last:
        console.print(
            f"{history.monitor}: best {best['value']:.2f} (step {best['step']}), "
            f"last {last['metrics'].get(history.monitor, float('nan')):.2f} (step {last['step']})"
        )
    _finish_wandb(loggers)
    if trainer.is_global_zero:
        write_json_atomic(
            {
                # best: the validation the best checkpoint holds (by monitor, as ModelCheckpoint); last: the final
                # one; metrics: every value of the end of training (last validation, last epoch's training)
                "monitor": history.monitor,
                "mode": history.mode,
                "best": best,
                "last": last,
                "metrics": metrics,
                "global_step": trainer.global_step,
                "resumed_from": ckpt_path,
                "elapsed_s": round(time.time() - started, 1),
            },
            out_dir / "metrics.json",
        )
    return {
        "metrics": metrics,
        "best": best,
        "last": last,
        "before": before,
        "after": after,
        "output_dir": str(out_dir),
        "global_step": trainer.global_step,
        "resumed_from": ckpt_path,
    }
