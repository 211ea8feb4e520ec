"""last.ckpt is the newest state at the end of fit, whether or not the last validation was the best (Lightning's
own ``save_last`` writes it only together with a new best)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from dalg.lit.checkpoint_io import AtomicCheckpointIO
from dalg.lit.checkpoint_read import read_checkpoint as read_lightning
from dalg.lit.last_checkpoint import LastCheckpoint


class Toy(pl.LightningModule):
    """A linear layer; its validation score falls after the first epoch, so the first epoch stays the best."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.layer(x).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("score", 100.0 - self.current_epoch, on_epoch=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def read_checkpoint(path):
    return read_lightning(path, lightning=False)  # a toy module: no hyper-parameters of this repository


def loader(n: int) -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(n, 4)), batch_size=1)


def train_toy(
    tmp_path, epochs: int, every: int, accumulate: int = 1, ckpt_path=None
) -> tuple[pl.Trainer, LastCheckpoint]:
    best = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path, filename="best", monitor="score", mode="max", save_top_k=1, save_last=False
    )
    last = LastCheckpoint(tmp_path, every_n_train_steps=every)
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[best, last],
        plugins=[AtomicCheckpointIO()],
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    trainer.fit(Toy(), loader(7), loader(2), ckpt_path=ckpt_path, weights_only=True)
    return trainer, last


def test_last_is_the_final_step_when_the_last_epoch_is_not_the_best(tmp_path):
    trainer, last = train_toy(tmp_path, epochs=3, every=5)  # 21 steps: step saves at 5..20, best at epoch 0
    final = read_checkpoint(tmp_path / "last.ckpt")
    assert trainer.global_step == 21 and final["global_step"] == 21 and final["epoch"] == 2
    assert last.last_model_path == str(tmp_path / "last.ckpt")
    assert read_checkpoint(tmp_path / "best.ckpt")["global_step"] == 7
    weights = {k.removeprefix("layer."): v for k, v in final["state_dict"].items()}
    assert torch.equal(weights["weight"], trainer.lightning_module.layer.weight.detach())
    # the saved loop state says the epoch and its validation are done: resuming trains nothing more
    resumed, _ = train_toy(tmp_path / "again", epochs=3, every=5, ckpt_path=tmp_path / "last.ckpt")
    assert resumed.global_step == 21


def test_step_saves_once_per_optimiser_step_under_accumulation(tmp_path, monkeypatch):
    steps: list[int] = []
    original = LastCheckpoint._save

    def spy(self, trainer):
        steps.append(trainer.global_step)
        original(self, trainer)

    monkeypatch.setattr(LastCheckpoint, "_save", spy)
    trainer, _ = train_toy(tmp_path, epochs=1, every=1, accumulate=2)  # 7 micro-batches -> 4 optimiser steps
    assert trainer.global_step == 4
    # one save per new step (the last micro-batch steps too), then once more after the validation at step 4
    assert steps == [1, 2, 3, 4, 4]
    assert read_checkpoint(tmp_path / "last.ckpt")["global_step"] == 4


def test_negative_interval_is_refused(tmp_path):
    with pytest.raises(ValueError, match="every_n_train_steps"):
        LastCheckpoint(tmp_path, every_n_train_steps=-1)


@pytest.mark.parametrize("experiment", ["ablation_cpu", "dalg_gldv2", "dolg_r50_gldv2"])
def test_every_experiment_config_builds_its_checkpoint_callbacks(experiment, tmp_path):
    """The experiment configs set callbacks.last_checkpoint (make ablate, the GLDv2 recipes): they compose, and
    the callbacks they give are one best-checkpoint ModelCheckpoint and one LastCheckpoint."""
    import yaml

    from dalg.train_pipeline import _instantiate_all
    from tests.conftest import CONF, compose_train

    cfg = compose_train([f"experiment={experiment}"], tmp_path)
    callbacks = _instantiate_all(cfg.callbacks)
    (last,) = [c for c in callbacks if isinstance(c, LastCheckpoint)]
    (best,) = [c for c in callbacks if isinstance(c, pl.callbacks.ModelCheckpoint)]
    assert best.monitor and not best.save_last  # last.ckpt has one writer
    raw = yaml.safe_load((CONF / "experiment" / f"{experiment}.yaml").read_text())
    wanted = raw["callbacks"]["last_checkpoint"]["every_n_train_steps"]
    assert last.every_n_train_steps == wanted and last.dirpath == tmp_path / "checkpoints"
