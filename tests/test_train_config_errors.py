"""Config errors stop src/train.py before training, with a message naming the key and the allowed values."""

import pytest
from hydra.errors import MissingConfigException
from omegaconf import open_dict

from dalg.train_pipeline import train
from dalg.utils.config_checks import ConfigError

from .conftest import compose_train, tiny_data_overrides


def _nothing_written(out):
    return not (out / "checkpoints").exists() and not (out / "csv").exists()


def test_unknown_fusion_group_lists_the_choices(tmp_path):
    with pytest.raises(MissingConfigException) as err:
        compose_train(["model/fusion=crossattn"], tmp_path)
    msg = str(err.value)
    assert "model/fusion" in msg and "crossattn" in msg
    for name in ("cross_attention", "orthogonal", "concat", "hadamard", "global_only", "local_only"):
        assert name in msg


def test_unknown_fusion_target_names_key_and_choices(tiny_synthetic, tmp_path):
    cfg = compose_train(tiny_data_overrides(tiny_synthetic), tmp_path)
    with open_dict(cfg):
        cfg.model.fusion._target_ = "dalg.models.fusion.CrossAttnFusion"
    with pytest.raises(
        ConfigError, match=r"model\.fusion\._target_.*allowed: model/fusion=\{.*cross_attention.*\}"
    ):
        train(cfg)
    assert _nothing_written(tmp_path)


def test_missing_data_root_names_the_key(tmp_path):
    cfg = compose_train(["data=gldv2", f"data.root={tmp_path / 'nope'}"], tmp_path)
    with pytest.raises(ConfigError, match=r"data\.root=.*nope does not exist"):
        train(cfg)
    assert _nothing_written(tmp_path)


def test_test_size_not_a_multiple_of_the_patch(tiny_synthetic, tmp_path):
    over = tiny_data_overrides(tiny_synthetic) + ["data.eval_sets.synthetic_heldout.test_size=100"]
    cfg = compose_train(over, tmp_path)
    with pytest.raises(
        ConfigError,
        match=r"data\.eval_sets\.synthetic_heldout\.test_size=100 is not a multiple of "
        r"the backbone's patch size 16.*96 or 112",
    ):
        train(cfg)
    assert _nothing_written(tmp_path)


def test_bad_resume_mode_and_missing_checkpoint(tiny_synthetic, tmp_path):
    cfg = compose_train(tiny_data_overrides(tiny_synthetic) + ["resume=yes"], tmp_path)
    with pytest.raises(ConfigError, match="resume='yes'; allowed: auto, never"):
        train(cfg)
    cfg = compose_train(tiny_data_overrides(tiny_synthetic) + [f"ckpt_path={tmp_path / 'x.ckpt'}"], tmp_path)
    with pytest.raises(ConfigError, match="ckpt_path=.*x.ckpt does not exist"):
        train(cfg)


def test_online_wandb_without_credentials_fails_instead_of_prompting(tiny_synthetic, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = compose_train(
        tiny_data_overrides(tiny_synthetic) + ["logger=default", "logger.wandb.offline=false"], tmp_path
    )
    with pytest.raises(ConfigError, match="logger.wandb.offline=false needs W&B credentials"):
        train(cfg)
