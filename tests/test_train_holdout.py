"""``data.val_fraction``: the classification hold-out is a validation dataloader after the retrieval sets."""

from __future__ import annotations

import math

import hydra
import torch

from dalg.train_pipeline import train

from .conftest import compose_train, tiny_data_overrides

HOLDOUT = ["data.val_fraction=0.25", "~data.eval_sets.landmarks_mini"]


def test_holdout_loader_follows_the_evaluation_sets(tiny_synthetic, tmp_path):
    cfg = compose_train(tiny_data_overrides(tiny_synthetic) + HOLDOUT, tmp_path)
    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    loaders = dm.val_dataloader()
    assert dm.classification_val_index == len(dm.eval_sets) == len(loaders) - 1
    # 4 images per class, a quarter held out: one per class, never in the training split
    assert len(dm.val_set) == dm.num_classes == 12
    assert not set(dm.val_set.samples.keys.tolist()) & set(dm.train_set.samples.keys.tolist())
    images, labels = next(iter(loaders[-1]))
    assert images.shape[1:] == (3, 64, 64) and labels.dtype == torch.long
    # deterministic: the same images twice (no random crops, flips or jitter)
    again, _ = next(iter(loaders[-1]))
    torch.testing.assert_close(images, again)


def test_training_logs_holdout_loss_and_accuracy(tiny_synthetic, tmp_path):
    over = (
        tiny_data_overrides(tiny_synthetic)
        + HOLDOUT
        + [
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "validate_before_fit=false",
            "logger=csv",
            "callbacks.rich_progress_bar=null",
            "trainer.enable_progress_bar=false",
        ]
    )
    result = train(compose_train(over, tmp_path))
    metrics = result["metrics"]
    assert 0.0 <= metrics["val/cls_acc"] <= 1.0
    assert math.isfinite(metrics["val/cls_loss"]) and metrics["val/cls_loss"] > 0
    assert "val/synthetic_heldout/mAP_M" in metrics  # the retrieval evaluation is unchanged
