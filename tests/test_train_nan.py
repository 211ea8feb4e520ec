"""A non-finite loss stops training with the step and the loss terms, and the last good checkpoint survives."""

import hashlib

import pytest
import pytorch_lightning as pl
import torch

from dalg.train_pipeline import train

from .conftest import compose_train, tiny_data_overrides


class PoisonAtStep(pl.Callback):
    """Makes the descriptor layer's weights NaN just before optimiser step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.net.descriptor.weight.fill_(float("nan"))


def test_nan_loss_stops_with_step_and_terms_and_keeps_last_checkpoint(tiny_synthetic, tmp_path):
    cfg = compose_train(
        tiny_data_overrides(tiny_synthetic)
        + [
            "~data.eval_sets.landmarks_mini",
            "trainer.max_epochs=1",
            "callbacks.last_checkpoint.every_n_train_steps=2",
            "validate_before_fit=false",
            "logger=csv",
            "callbacks.rich_progress_bar=null",
            "trainer.enable_progress_bar=false",
            "+callbacks.poison._target_=tests.test_train_nan.PoisonAtStep",
            "+callbacks.poison.step=3",
        ],
        tmp_path,
    )
    last = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(FloatingPointError) as err:
        train(cfg)
    msg = str(err.value)
    assert "global step 3" in msg and "epoch 0" in msg
    assert "loss (margin softmax cross-entropy) = nan" in msg and "non-finite descriptors = 8" in msg
    assert "descriptor.weight" in msg and str(last) in msg
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    digest = hashlib.sha256(last.read_bytes()).hexdigest()
    assert not list(last.parent.glob("*.tmp")) and digest  # written whole, nothing half-written beside it
