"""The LightningModule: trains a DALG/DOLG network with a margin head and extracts descriptors for evaluation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from dalg.lit.optim import build_optimizer, warmup_cosine


class RetrievalModule(pl.LightningModule):
    """``net`` is built from ``model_cfg`` (a resolved ``cfg.model``), so a checkpoint alone rebuilds it.

    Validation batches are ``(images, index)`` from Revisited-format sets: ``validation_step`` returns their
    descriptors and the retrieval callback ranks and scores them at the end of the epoch.
    """

    def __init__(self, model_cfg: Mapping[str, Any], num_classes: int, optimizer: Mapping[str, Any],
                 weight_decay: float = 1e-4, warmup_epochs: float = 1.0, min_lr_ratio: float = 0.0,
                 eval_scales: Sequence[float] | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.net = hydra.utils.instantiate(dict(model_cfg), num_classes=num_classes)
        self.eval_scales = tuple(eval_scales) if eval_scales else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    # ------------------------------------------------------------------------------------------ training
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        desc = self.net(images)
        logits = self.net.head(desc, labels)
        loss = F.cross_entropy(logits, labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {loss.item()} at global step {self.global_step} "
                                     f"(margin softmax cross-entropy); last good checkpoint left untouched")
        with torch.no_grad():
            acc = (self.net.head(desc.detach()).argmax(1) == labels).float().mean()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(labels))
        self.log("train/acc", acc, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    # ---------------------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int,
                        dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        images, index = batch
        return {"descriptors": self.net.extract(images, self.eval_scales).float(), "index": index}

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        return self.validation_step(batch, batch_idx, dataloader_idx)

    # ----------------------------------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        factory = hydra.utils.instantiate(dict(self.hparams.optimizer), _partial_=True)
        optimizer = build_optimizer(factory, self, self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(round(self.hparams.warmup_epochs * total / max(1, self.trainer.max_epochs or 1)))
        warmup = min(max(1, warmup), total)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, warmup, total, self.hparams.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
