"""``checkpoints/last.ckpt``: the newest training state, always, for resuming and for "the final model".

Lightning 2.5+'s ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` only at a step where it also saved a
top-k checkpoint (or on a step schedule). A run whose final epoch was not its best therefore ended with a
``last.ckpt`` from an older step: `make run` (336 steps, best at 280, a step checkpoint every 50) finished with
``last.ckpt`` at step 300, and the outputs listed it as the last checkpoint. This callback owns ``last.ckpt``:

* every ``every_n_train_steps`` optimiser steps (a killed run loses at most that many; ``resume=auto`` continues);
* after every validation of ``fit`` (the state the validation's metrics belong to, loop counters included);
* at the end of ``fit`` if the newest step was not saved yet.

It is a :class:`~pytorch_lightning.callbacks.Checkpoint`, so Lightning runs it after the other callbacks (the best
checkpoint's bookkeeping included), and writes through the trainer's checkpoint IO (atomic: ``AtomicCheckpointIO``).
It never writes after an exception: a run stopped by a NaN keeps its last good file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.trainer.states import TrainerFn


class LastCheckpoint(Checkpoint):
    FILE_NAME = "last.ckpt"

    def __init__(self, dirpath: str | Path, every_n_train_steps: int = 0) -> None:
        if every_n_train_steps < 0:
            raise ValueError(
                f"last_checkpoint.every_n_train_steps must be >= 0 (0: off), got {every_n_train_steps}"
            )
        self.dirpath = Path(dirpath)
        self.every_n_train_steps = int(every_n_train_steps)
        self.last_model_path = ""  # as ModelCheckpoint's: set once a file is written
        self._saved_step: int | None = None  # global_step of the newest file
        self._validated_step: int | None = None  # global_step of the newest file written after a validation

    @property
    def path(self) -> Path:
        return self.dirpath / self.FILE_NAME

    def _save(self, trainer: pl.Trainer) -> None:
        trainer.save_checkpoint(self.path)  # every rank calls it; the strategy writes on rank 0
        self.last_model_path = str(self.path)
        self._saved_step = trainer.global_step

    @staticmethod
    def _fitting(trainer: pl.Trainer) -> bool:
        return (
            trainer.state.fn == TrainerFn.FITTING
            and not trainer.sanity_checking
            and not bool(trainer.fast_dev_run)
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a resumed run starts from a saved state: nothing new to write until it takes a step
        self._saved_step = self._validated_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        n, step = self.every_n_train_steps, trainer.global_step
        # under gradient accumulation global_step stays put for several micro-batches: one save per step
        if n and step % n == 0 and step != self._saved_step and self._fitting(trainer):
            self._save(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # also when a step save at the same step came first: this state has the validation in its loop counters
        if self._fitting(trainer) and trainer.global_step != self._validated_step:
            self._save(trainer)
            self._validated_step = trainer.global_step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fitting(trainer) and trainer.global_step != self._saved_step:
            self._save(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"dirpath": str(self.dirpath), "last_model_path": self.last_model_path}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("dirpath") == str(self.dirpath):
            self.last_model_path = state_dict.get("last_model_path", "")
