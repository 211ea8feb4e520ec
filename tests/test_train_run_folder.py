"""A run folder is one run's: a second run with the same run_name is refused while the first runs, and a resume
from a checkpoint of another model is refused before config.yaml or the run metadata are rewritten."""

from __future__ import annotations

import logging

import pytest
import torch
from pytorch_lightning.utilities import rank_zero_only

from dalg import train_pipeline
from dalg.lit.resume_check import check_resume_model
from dalg.train_pipeline import build_module, train
from dalg.utils.lock import LockHeldError

from .conftest import TINY_SYNTHETIC, compose_train, tiny_data_overrides
from .test_utils_lock import hold_lock


def test_second_run_with_the_same_folder_is_refused(tiny_synthetic, tmp_path):
    holder = hold_lock(tmp_path / "run.lock")  # a run of the same run_name, still training
    try:
        cfg = compose_train(tiny_data_overrides(tiny_synthetic), tmp_path)
        with pytest.raises(
            LockHeldError, match=rf"run folder .* is in use by another process \(pid {holder.pid} "
        ):
            train(cfg)
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "checkpoints").exists()


def test_only_the_launching_process_locks(monkeypatch):
    monkeypatch.delenv("NODE_RANK", raising=False)
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    assert train_pipeline._launching_process()
    monkeypatch.setattr(rank_zero_only, "rank", 1)  # a DDP rank Lightning started (LOCAL_RANK=1)
    assert not train_pipeline._launching_process()
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    monkeypatch.setenv("NODE_RANK", "1")  # rank 0 of the second node's launcher
    assert not train_pipeline._launching_process()


def _save(module, path, step=4):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "global_step": step,
            "epoch": 0,
        },
        path,
    )


def test_resume_with_another_model_is_refused_before_anything_is_written(tiny_synthetic, tmp_path, caplog):
    n_classes = TINY_SYNTHETIC["train_classes"]
    old_cfg = compose_train(tiny_data_overrides(tiny_synthetic) + ["model.embed_dim=256"], tmp_path)
    old = build_module(old_cfg, n_classes)
    last = tmp_path / "checkpoints" / "last.ckpt"
    _save(old, last)  # the folder's run: 256-d descriptors
    (tmp_path / "config.yaml").write_text("the 256-d run's config\n")

    cfg = compose_train(tiny_data_overrides(tiny_synthetic), tmp_path)  # same run folder, default 512-d model
    with pytest.raises(ValueError, match=r"cannot resume from .*last.ckpt: it holds another model") as err:
        train(cfg)
    assert "model.embed_dim: 256 vs 512" in str(err.value) and "differ in shape" in str(err.value)
    assert (tmp_path / "config.yaml").read_text() == "the 256-d run's config\n"
    assert not list(tmp_path.glob("run_meta*.json"))

    check_resume_model(last, old)  # its own model resumes
    changed = build_module(
        compose_train(
            tiny_data_overrides(tiny_synthetic) + ["model.embed_dim=256", "model.head.margin=0.3"], tmp_path
        ),
        n_classes,
    )
    with caplog.at_level(logging.WARNING, logger="dalg.lit.resume_check"):
        check_resume_model(last, changed)  # same weights, another margin: resumes, and says so
    assert "model.head.margin: 0.15 vs 0.3" in caplog.text
