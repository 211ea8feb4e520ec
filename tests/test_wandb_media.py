"""The W&B validation media callback on hand-made inputs: the per-query table (AP, thumbnails bordered by label)
and the best checkpoint as an offline artifact (log_model)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from dalg.lit.wandb_logging import BORDER, WandbValidationMedia, overlay

from .wandb_offline import read_finished_run

wandb = pytest.importorskip("wandb")


def _set_result(tmp_path):
    paths = []
    for i, colour in enumerate([(255, 255, 0)] * 2 + [(0, 0, 255)] * 4):
        p = tmp_path / f"img{i}.jpg"
        Image.new("RGB", (40, 30), colour).save(p)
        paths.append(str(p))
    aps = {"E": np.array([1.0, np.nan]), "M": np.array([0.5, 0.25]), "H": np.array([np.nan, 0.25])}
    return SimpleNamespace(
        name="toy",
        scores=SimpleNamespace(aps=aps),
        ranks=np.array([[0, 1, 2, 3], [3, 2, 1, 0]]),
        query_paths=paths[:2],
        query_boxes=[(0, 0, 20, 15), None],
        database_paths=paths[2:],
        gnd=[{"easy": [0], "hard": [], "junk": [1]}, {"easy": [], "hard": [2], "junk": []}],
    )


def test_query_table_rows_aps_and_label_borders(tmp_path):
    cb = WandbValidationMedia(table_queries=10, top_k=3, thumb=32, setup="M")
    table = cb.query_table(_set_result(tmp_path), wandb)
    assert table.columns == ["query", "image", "AP_E", "AP_M", "AP_H", "top1", "top2", "top3"]
    assert len(table.data) == 2
    q0, q1 = table.data
    assert q0[2:5] == [100.0, 50.0, pytest.approx(float("nan"), nan_ok=True)] and q1[3] == 25.0
    kinds = [img._caption.rsplit("(", 1)[1].rstrip(")") for img in q0[5:]]
    assert kinds == ["positive", "junk", "negative"]
    assert [img._caption.rsplit("(", 1)[1].rstrip(")") for img in q1[5:]] == [
        "negative",
        "positive",
        "negative",
    ]
    tile = q0[5].image  # the PIL thumbnail: its border is the label's colour
    assert tile.size == (32, 32) and tile.getpixel((0, 0)) == BORDER["positive"]


def test_overlay_puts_each_map_beside_the_image():
    maps = {
        "image": np.zeros((4, 6, 3), np.uint8),
        "spatial attention": np.ones((4, 6)),
        "x": np.zeros((4, 6)),
    }
    strip, names = overlay(maps)
    assert strip.shape == (4, 18, 3) and names == ["image", "spatial attention", "x"]
    assert strip[:, :6].max() == 0 and strip[:, 6:].max() > 0


def test_best_checkpoint_is_logged_as_an_offline_artifact(tmp_path, monkeypatch):
    from pytorch_lightning.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    best = tmp_path / "epoch003.ckpt"
    best.write_bytes(b"checkpoint bytes")
    logger = WandbLogger(project="dalg", save_dir=str(tmp_path), offline=True, name="t")
    ckpt = SimpleNamespace(best_model_path=str(best), best_model_score=0.7, monitor="val/toy/mAP_M")
    trainer = SimpleNamespace(loggers=[logger], checkpoint_callbacks=[ckpt], global_step=12)
    WandbValidationMedia(log_model=False).on_fit_end(trainer, None)
    WandbValidationMedia(log_model=True).on_fit_end(trainer, None)
    logger.experiment.finish()
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    (art,) = [
        a for a in read_finished_run(run_dir).artifacts if a.type == "model"
    ]  # one: log_model=False logs none
    assert art.name == f"model-{logger.version}"
    assert [c.path for c in art.manifest.contents] == ["best.ckpt"]
    assert "val/toy/mAP_M" in art.metadata and "epoch003.ckpt" in art.metadata
