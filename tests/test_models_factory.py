"""dalg.create_model: any model config by name, overrides as keyword arguments, configs found through the package."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import dalg
from dalg import create_model
from dalg.factory import (
    CONFIG_DIR,
    config_groups,
    fusion_name_by_class,
    fusion_names,
    group_options,
    instantiate_model,
    model_config,
    model_names,
)
from dalg.models import fusion as fusion_module
from dalg.models.composer import DALG

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def test_packaged_configs_are_the_checkouts_model_configs() -> None:
    assert CONFIG_DIR.parent == Path(dalg.__file__).parent
    assert CONFIG_DIR.resolve() == (CONF / "model").resolve()
    assert model_names() == sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
    assert {"dalg_cross", "dalg_heuristic", "dalg_tiny", "dolg_r50", "dolg_r101", "dolg_tiny"} <= set(
        model_names()
    )
    assert config_groups() == ["backbone", "fusion", "global_branch", "head", "local_branch"]


@pytest.mark.parametrize("name", model_names())
def test_model_config_equals_the_training_configs_model(name: str) -> None:
    """Composed from the package, a model config is what `python src/train.py model=<name>` builds."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        train = compose(config_name="train", overrides=[f"model={name}"]).model
    ours = model_config(name, pretrained=None)
    assert OmegaConf.to_container(ours, resolve=True) == OmegaConf.to_container(train, resolve=True)


def test_create_model_defaults_to_random_weights_without_a_head() -> None:
    model = create_model("dalg_tiny")
    assert isinstance(model, DALG) and model.head is None
    assert model_config("dalg_cross").backbone.pretrained is False  # timm's habit: pretrained=False
    assert model_config("dalg_cross", pretrained=None).backbone.pretrained is True  # the config's own choice
    assert create_model("dalg_tiny", num_classes=7).head.num_classes == 7


def test_overrides_pick_group_options_and_set_values() -> None:
    model = create_model(
        "dalg_tiny",
        fusion="concat",
        head="cosface",
        embed_dim=256,
        local_branch={"window": 5},
        **{"backbone.local_block": 3, "global_branch.out_dim": 64},
        num_classes=3,
    )
    assert type(model.fusion).__name__ == "ConcatFusion" and type(model.head).__name__ == "CosFace"
    assert model.embed_dim == 256 and model.local_branch.window_blocks[0].window == 5
    assert model.backbone.local_block == 3 and model.global_branch.out_dim == 64
    assert model.local_branch.out_dim == 128  # a dict merges into its section: the rest is kept
    d = model(torch.randn(2, 3, 64, 64))
    assert d.shape == (2, 256)


def test_bad_overrides_name_the_key_and_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'dalg_nope'.*dalg_cross"):
        create_model("dalg_nope")
    with pytest.raises(ValueError, match=r"fusion='xx' is not one of \[.*cross_attention"):
        create_model("dalg_tiny", fusion="xx")
    with pytest.raises(ValueError, match=r"no key 'embed_dimm'.*embed_dim"):
        create_model("dalg_tiny", embed_dimm=3)
    with pytest.raises(ValueError, match=r"no key 'local_branch.windo'.*window"):
        create_model("dalg_tiny", **{"local_branch.windo": 3})
    with pytest.raises(ValueError, match="no model config group 'fusions'"):
        group_options("fusions")


def test_fusion_names_come_from_the_fusion_configs() -> None:
    assert fusion_names() == sorted(p.stem for p in (CONF / "model" / "fusion").glob("*.yaml"))
    by_class = fusion_name_by_class()
    assert sorted(by_class.values()) == fusion_names()
    # every Fusion subclass has a config, and each name builds the class it is named for
    classes = {
        n
        for n, c in vars(fusion_module).items()
        if isinstance(c, type) and issubclass(c, fusion_module.Fusion) and c is not fusion_module.Fusion
    }
    assert set(by_class) == classes
    for cls, name in by_class.items():
        assert model_config("dalg_tiny", fusion=name).fusion._target_.endswith(f".{cls}")


def test_create_model_inside_a_running_hydra_app() -> None:
    """train.py runs under Hydra: composing a model config there must neither fail nor unset the app's Hydra."""
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        app = GlobalHydra.instance().hydra
        assert create_model("dalg_tiny", fusion="orthogonal").fusion.__class__.__name__ == "OrthogonalFusion"
        assert GlobalHydra.instance().hydra is app
        assert compose(config_name="train").model.fusion._target_.endswith("CrossAttentionFusion")


def test_checkpoints_naming_the_old_module_path_still_build() -> None:
    """model_cfg in checkpoints written before the composer's module was renamed (models/dalg.py)."""
    cfg = OmegaConf.to_container(model_config("dalg_tiny"), resolve=True)
    cfg["_target_"] = "dalg.models.dalg.DALG"
    assert isinstance(instantiate_model(cfg, num_classes=0), DALG)


def _run_outside(code: str, cwd: Path, pythonpath: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


PROBE = """
import json, sys
from pathlib import Path
import dalg
from dalg import create_model
import dalg.factory as f
m = create_model("dalg_tiny", fusion="concat")
print(json.dumps({"package": str(Path(dalg.__file__).parent), "configs": str(f.CONFIG_DIR),
                  "embed_dim": m.embed_dim, "fusion": type(m.fusion).__name__,
                  "path": [str(Path(p).resolve()) for p in sys.path]}))
"""


def test_create_model_from_another_directory(tmp_path: Path) -> None:
    """The configs are read through the installed package, never from the working directory: a decoy
    conf/model/dalg_tiny.yaml in the cwd would give embed_dim 7."""
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "dalg_tiny.yaml").write_text("_target_: nowhere.Nothing\nembed_dim: 7\n")
    got = _run_outside(PROBE, tmp_path)
    assert got["embed_dim"] == 512 and got["fusion"] == "ConcatFusion"
    assert Path(got["configs"]).parent == Path(got["package"])
    assert str(REPO) not in got["path"]  # the checkout is reached only through the installed package


@pytest.mark.slow
def test_create_model_from_a_built_wheel(tmp_path: Path) -> None:
    """Build the wheel (from a copy of the checkout), unpack it alone on the path, create a model from it."""
    src = tmp_path / "checkout"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "conf", src / "conf")
    shutil.copytree(
        REPO / "src", src / "src", symlinks=True, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__")
    )
    pip = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(tmp_path),
    ]
    subprocess.run([*pip, str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("dalg-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(tmp_path / "site")
    assert "dalg/model_configs/dalg_cross.yaml" in names and "dalg/model_configs/fusion/concat.yaml" in names
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    got = _run_outside(PROBE, elsewhere, pythonpath=tmp_path / "site")
    assert Path(got["package"]) == tmp_path / "site" / "dalg" and got["fusion"] == "ConcatFusion"
