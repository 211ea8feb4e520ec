"""The real default config, trained for a few steps, then evaluated by the retrieval callback."""

import csv
import math

import pytest

from dalg.train_pipeline import train

from .conftest import LANDMARKS_MINI, compose_train, tiny_data_overrides


@pytest.fixture(scope="module")
def trained(tiny_synthetic, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = compose_train(
        tiny_data_overrides(tiny_synthetic)
        + [
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false",
            "callbacks.rich_progress_bar=null",
            "logger=default",
            "validate_before_fit=true",
        ],
        out,
    )
    return train(cfg), out


def test_default_config_trains_and_reports_revisited_map(trained):
    result, out = trained
    sets = {"synthetic_heldout", "landmarks_mini"} if LANDMARKS_MINI.exists() else {"synthetic_heldout"}
    assert set(result["after"]) == sets and set(result["before"]) == sets
    for name in sets:
        for key in ("mAP_E", "mAP_M", "mAP_H", "mP@1_M", "mP@5_M", "mP@10_M"):
            value = result["after"][name][key]
            assert 0.0 <= value <= 100.0 and not math.isnan(value), (name, key, value)
            assert result["metrics"][f"val/{name}/{key}"] == pytest.approx(value)


def test_run_writes_checkpoint_csv_wandb_and_grids(trained):
    result, out = trained
    assert (out / "checkpoints" / "last.ckpt").is_file()
    from dalg.lit.checkpoint_read import checkpoint_step

    # last.ckpt is the final state, even when the last validation was not the best (Lightning's save_last was not)
    assert checkpoint_step(out / "checkpoints" / "last.ckpt") == result["global_step"] > 0
    assert result["last"]["checkpoint"] == str(out / "checkpoints" / "last.ckpt")
    assert (out / "checkpoints" / "label_map.json").is_file()
    assert (out / "config.yaml").is_file()
    with open(out / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("val/synthetic_heldout/mAP_M") for r in rows)
    assert any(r.get("train/loss_step") for r in rows)
    assert list((out / "wandb").glob("offline-run-*")), "no offline W&B run"
    grids = sorted((out / "retrieval").glob("synthetic_heldout_epoch*.png"))
    assert grids, "no result grid"
    from PIL import Image

    with Image.open(grids[-1]) as img:
        assert img.width == 11 * 96 and img.height == 4 * 96


def test_checkpoint_rebuilds_the_model(trained):
    import torch

    from dalg.lit.module import RetrievalModule

    result, out = trained
    module = RetrievalModule.load_from_checkpoint(
        out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    x = torch.randn(2, 3, 64, 48)
    desc = module.net.extract(x)
    assert desc.shape == (2, module.net.embed_dim)
    assert torch.allclose(desc.norm(dim=1), torch.ones(2), atol=1e-5)


def test_run_metadata_has_git_commit_and_dataset_fingerprint(trained, tiny_synthetic):
    import hashlib
    import json

    result, out = trained
    meta = json.loads((out / "run_meta.json").read_text())
    assert meta["git"]["commit"] is None or len(meta["git"]["commit"]) == 40
    files = meta["data"]["files"]
    train_csv = tiny_synthetic / "train_clean.csv"
    assert files["train"]["sha256"] == hashlib.sha256(train_csv.read_bytes()).hexdigest()
    assert files["eval/synthetic_heldout"]["sha256"] is not None
    assert len(meta["data"]["sha256"]) == 64 and meta["data"]["train_classes"] == 12
    final = json.loads((out / "metrics.json").read_text())
    assert final["global_step"] == result["global_step"] == 2
    assert final["metrics"]["val/synthetic_heldout/mAP_M"] == pytest.approx(
        result["metrics"]["val/synthetic_heldout/mAP_M"]
    )
