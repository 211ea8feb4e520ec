"""Shared fixtures: composing the real configs, and small generated datasets."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

import dalg.utils.config  # noqa: F401  (registers ${repo_root:})
from dalg.data.synthetic import TINY_SYNTHETIC, ensure_synthetic_landmarks

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
LANDMARKS_MINI = REPO.parent / "shared" / "data" / "landmarks-mini"


def compose_config(config_name: str, overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """A real config of ``conf/`` (``train``, ``eval``, ``extract``, ``model/backbone/vit_small``...) with
    command-line overrides; ``paths.output_dir`` (a Hydra runtime value) set when given. Models alone:
    ``dalg.factory.model_config`` / ``dalg.create_model``."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


def load_entry(name: str):
    """A ``src/<name>.py`` entry script as a module (its functions, without running ``main``)."""
    spec = importlib.util.spec_from_file_location(f"dalg_{name}_entry", REPO / "src" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def compose_train(overrides: list[str], output_dir: Path) -> DictConfig:
    """The real ``conf/train.yaml`` with overrides, and ``paths.output_dir`` set."""
    return compose_config("train", overrides, output_dir)


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "tiny"
    return ensure_synthetic_landmarks(root, **TINY_SYNTHETIC)


def tiny_data_overrides(root: Path) -> list[str]:
    """Overrides that point the default data config at the tiny set and make every loop short."""
    over = [
        f"data.root={root}",
        "data.num_workers=0",
        "data.batch_size=8",
        "data.train_size=64",
        "data.eval_sets.synthetic_heldout.test_size=64",
        "data.eval_sets.landmarks_mini.test_size=64",
    ]
    over += [f"data.generator.{k}={v}" for k, v in TINY_SYNTHETIC.items()]
    return over
