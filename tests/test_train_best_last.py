"""Best, not last (metrics.json, the Optuna objective), the console transcript, the landmarks-mini hint only when
it applies, and the W&B run's identity (issue 14 items 3-6)."""

from __future__ import annotations

import sys

import pytest
from rich.console import Console
from rich.table import Table

from dalg.lit.validation_history import ValidationHistory
from dalg.lit.wandb_logging import label_of, wandb_run_args
from dalg.train_pipeline import landmarks_mini_hint, objective
from dalg.utils.transcript import clean, transcript

from .conftest import compose_train, tiny_data_overrides

M = "val/s/mAP_M"


def test_history_best_is_the_checkpoints_best_strictly_greater():
    h = ValidationHistory(monitor=M)
    for step, value in ((2, 50.0), (4, 60.0), (6, 60.0), (8, float("nan")), (10, 55.0)):
        h.record(step, step // 2, {M: value, "val/s/mAP_H": value / 2})
    assert (
        h.best["step"] == 4 and h.last["step"] == 10
    )  # a tie does not replace the first best, NaN never wins
    assert h.best_with({M: 61.0})[M] == 61.0 and h.best_with({M: 59.0})[M] == 60.0
    restored = ValidationHistory(monitor=M)
    restored.load_state_dict(h.state_dict())
    assert restored.best == h.best and restored.entries == h.entries
    low = ValidationHistory(monitor="val/cls_loss", mode="min")
    for step, value in ((1, 2.0), (2, 1.0), (3, 1.5)):
        low.record(step, 0, {"val/cls_loss": value})
    assert low.best["step"] == 2
    with pytest.raises(ValueError, match="mode"):
        ValidationHistory(mode="best")


def test_objective_is_the_best_validation_not_the_last():
    result = {"metrics": {M: 40.0}, "best": {"metrics": {M: 60.0}}}
    assert objective(result, M) == 60.0
    assert objective({"metrics": {M: 40.0}, "best": None}, M) == 40.0  # no validation during training
    assert objective(result, None) is None


def test_landmarks_mini_hint_only_after_synthetic_training(tiny_synthetic, tmp_path):
    cfg = compose_train(tiny_data_overrides(tiny_synthetic), tmp_path)
    hint = landmarks_mini_hint(cfg, {"landmarks_mini": {}, "synthetic_heldout": {}})
    assert hint and "synthetic scenes only from scratch" in hint
    assert landmarks_mini_hint(cfg, {"synthetic_heldout": {}}) is None  # not evaluated
    gldv2 = compose_train(["data=gldv2", "data.root=/data/gldv2"], tmp_path)
    assert landmarks_mini_hint(gldv2, {"landmarks_mini": {}}) is None  # trained on a real folder


def test_transcript_keeps_tables_and_drops_progress_redraws(tmp_path, capsys):
    log = tmp_path / "run" / "train.log"
    table = Table(title="retrieval after epoch 0")
    table.add_column("set")
    table.add_column("mAP")
    table.add_row("synthetic_heldout", "53.48")
    with transcript(log):
        print("plain line")
        Console(force_terminal=True).print(table)  # colours and bold: removed in the file
        sys.stdout.write("\x1b[?25l\x1b[2K\x1b[1AEpoch 0/1 ━━━━━━━╸━━━━ 3/8 0:00:01 • 0:00:02 2.1it/s\n")
        sys.stderr.write("a warning\n")
    text = log.read_text()
    assert "plain line" in text and "retrieval after epoch 0" in text and "synthetic_heldout │ 53.48" in text
    assert "a warning" in text and "\x1b" not in text and "it/s" not in text
    out = capsys.readouterr()
    assert "it/s" in out.out and "plain line" in out.out  # the terminal saw everything as before
    assert clean("50%|█████     | 1/2\r100%|██████████| 2/2\n", live=False) == ""


def test_wandb_run_identity():
    job = {
        "mode": "multirun",
        "num": 1,
        "folder": "/l/fus/1_fusion-orthogonal",
        "varying": {"model/fusion": "orthogonal"},
    }
    assert wandb_run_args("fus", "train", job) == {
        "name": "fus/1_fusion-orthogonal",
        "group": "fus",
        "tags": ["model/fusion=orthogonal"],
        "job_type": "train",
    }
    single = wandb_run_args(
        "gldv2_dalg", "train", {"mode": "run", "folder": "/l/gldv2_dalg", "varying": {"a": "1"}}
    )
    assert single == {"name": "gldv2_dalg", "group": "gldv2_dalg", "tags": [], "job_type": "train"}
    gnd = {"easy": [1], "hard": [2], "junk": [3]}
    assert [label_of(i, gnd, "M") for i in (1, 2, 3, 4)] == ["positive", "positive", "junk", "negative"]
    assert [label_of(i, gnd, "H") for i in (1, 2)] == ["junk", "positive"]
