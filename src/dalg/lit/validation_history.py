"""The validation metrics of every validation during ``fit``, and which one is the best.

"Best" follows the run's ``ModelCheckpoint`` (its ``monitor`` and ``mode``; a later validation must be strictly
better, as ModelCheckpoint's top-1 rule): what ``metrics.json`` (``best``), the Optuna objective, the sweep summary
and W&B's ``best/...`` keys report is what the best checkpoint holds. The history is part of the checkpoint
(callback state), so a resumed run keeps its earlier validations.
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl


def _better(a: float, b: float | None, mode: str) -> bool:
    if math.isnan(a):
        return False
    return b is None or (a > b if mode == "max" else a < b)


class ValidationHistory(pl.Callback):
    def __init__(self, monitor: str | None = None, mode: str = "max") -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"ValidationHistory mode must be 'max' or 'min', got {mode!r}")
        self.monitor = monitor
        self.mode = mode
        self.entries: list[dict[str, Any]] = []  # {"step", "epoch", "metrics": {key: value}}
        self.best_index: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # the checkpoint callback that keeps the best one (last_checkpoint has no monitor)
        ckpt = next((c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)), None)
        if self.monitor is None and ckpt is not None:
            self.monitor, self.mode = ckpt.monitor, ckpt.mode

    def best_with(self, metrics: dict[str, float]) -> dict[str, float]:
        """The best validation's metrics if ``metrics`` (not yet recorded) were added."""
        best = self.best
        if self.monitor in metrics and _better(
            metrics[self.monitor], best["metrics"].get(self.monitor) if best else None, self.mode
        ):
            return dict(metrics)
        return dict(best["metrics"]) if best else {}

    def record(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        self.entries.append({"step": int(step), "epoch": int(epoch), "metrics": dict(metrics)})
        value = metrics.get(self.monitor) if self.monitor else None
        if value is not None and _better(value, self._best_value(), self.mode):
            self.best_index = len(self.entries) - 1

    def _best_value(self) -> float | None:
        return self.entries[self.best_index]["metrics"][self.monitor] if self.best_index is not None else None

    @property
    def best(self) -> dict[str, Any] | None:
        return self.entries[self.best_index] if self.best_index is not None else None

    @property
    def last(self) -> dict[str, Any] | None:
        return self.entries[-1] if self.entries else None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # runs before ModelCheckpoint's on_validation_end (Lightning calls checkpoint callbacks last), after the
        # epoch's logged values reached callback_metrics
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith("val/") and getattr(v, "numel", lambda: 1)() == 1
        }
        if metrics:
            self.record(trainer.global_step, trainer.current_epoch, metrics)

    def state_dict(self) -> dict[str, Any]:
        return {
            "entries": self.entries,
            "best_index": self.best_index,
            "monitor": self.monitor,
            "mode": self.mode,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.entries = list(state_dict.get("entries", []))
        self.best_index = state_dict.get("best_index")
