"""Exponential moving average of the network's weights, evaluated instead of the raw weights when enabled."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch


class EMAWeights(pl.Callback):
    """Keeps ``ema = decay * ema + (1 - decay) * w`` for every floating-point tensor of ``pl_module.net``
    (parameters and buffers) after each optimiser step, from ``start_step`` on. Under gradient accumulation
    (``trainer.accumulate_grad_batches``) a micro-batch that does not step the optimiser leaves the average alone:
    the update runs when ``trainer.global_step`` has advanced, so ``decay`` is per optimiser step.

    Validation (the retrieval callback) runs on the averaged weights; training resumes with the raw ones. The
    average is part of the checkpoint (callback state), so a resumed run continues it; at the end of ``fit`` the
    averaged weights are copied into the model when ``apply_at_end``. Checkpoints hold the raw weights (training
    resumes from them) and the average (this callback's state); evaluation takes the average by default
    (``RetrievalModule.from_checkpoint_dict(weights="auto")``), as the run's outputs say.
    """

    def __init__(self, decay: float = 0.9998, start_step: int = 0, apply_at_end: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"callbacks.ema.decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.start_step = start_step
        self.apply_at_end = apply_at_end
        self.shadow: dict[str, torch.Tensor] = {}
        self._backup: dict[str, torch.Tensor] | None = None
        self._stepped_at: int | None = None  # trainer.global_step at the last update

    def _tensors(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        return {
            k: v for k, v in pl_module.net.state_dict(keep_vars=True).items() if v.dtype.is_floating_point
        }

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        current = self._tensors(pl_module)
        if self.shadow:  # restored from a checkpoint
            self.shadow = {k: v.to(current[k].device) for k, v in self.shadow.items()}
        else:
            self.shadow = {k: v.detach().clone() for k, v in current.items()}
        self._stepped_at = trainer.global_step

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._stepped_at:  # an accumulation micro-batch: no optimiser step yet
            return
        self._stepped_at = trainer.global_step
        if trainer.global_step < self.start_step:
            for k, v in self._tensors(pl_module).items():
                self.shadow[k].copy_(v.detach())
            return
        for k, v in self._tensors(pl_module).items():
            self.shadow[k].lerp_(v.detach().to(self.shadow[k].dtype), 1.0 - self.decay)

    @torch.no_grad()
    def _swap_in(self, pl_module: pl.LightningModule) -> None:
        if not self.shadow or self._backup is not None:
            return
        current = self._tensors(pl_module)
        self._backup = {k: v.detach().clone() for k, v in current.items()}
        for k, v in current.items():
            v.data.copy_(self.shadow[k])

    @torch.no_grad()
    def _swap_out(self, pl_module: pl.LightningModule) -> None:
        if self._backup is None:
            return
        for k, v in self._tensors(pl_module).items():
            v.data.copy_(self._backup[k])
        self._backup = None

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._swap_in(pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out(pl_module)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # the checkpoint's state_dict holds the raw weights even when saved during validation
        if self._backup is not None:
            prefix = "net."
            for k, v in self._backup.items():
                checkpoint["state_dict"][prefix + k] = v.clone()

    @torch.no_grad()
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.apply_at_end and self.shadow:
            for k, v in self._tensors(pl_module).items():
                v.data.copy_(self.shadow[k])

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": {k: v.detach().cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.shadow = {k: v.clone() for k, v in state_dict["shadow"].items()}


def ema_shadow(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
    """The averaged weights an :class:`EMAWeights` callback saved in a training checkpoint (keys of the module's
    ``net``), or ``None`` when the run had no EMA. Lightning files callback states under the class name."""
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if (
            str(key).split("{")[0] == EMAWeights.__qualname__
            and isinstance(state, Mapping)
            and "shadow" in state
        ):
            return dict(state["shadow"])
    return None
