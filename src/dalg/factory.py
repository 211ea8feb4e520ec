"""Build a model by its config name, timm's habit: ``dalg.create_model("dalg_cross", **overrides)``.

The model configs ship inside the package: ``dalg/model_configs`` is the checkout's ``conf/model`` folder (a
symbolic link, so the training configs and this factory read the same files) and a copy of it in an installed
wheel (package data, pyproject.toml). So ``from dalg import create_model`` works from any working directory,
with or without the repository.

    from dalg import create_model
    net = create_model("dalg_tiny")                                   # random weights, no margin head
    net = create_model("dalg_cross", pretrained=True, num_classes=1000)
    net = create_model("dalg_tiny", fusion="concat", embed_dim=256)   # a group choice, a value
    net = create_model("dalg_tiny", local_branch={"window": 7}, **{"backbone.local_block": 3})

An override whose key names a config group (a sub-folder of the model configs: ``backbone``, ``fusion``, ...)
and whose value is a string picks that group's option (``model/fusion=concat`` on the command line); any other
key is a dotted path into the model config, set to the value (a dict is merged into that section).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# not resolved: the configs are found through the package, wherever it is installed
CONFIG_DIR = Path(__file__).parent / "model_configs"
# the composer's earlier module path, still named by the model_cfg of older checkpoints
LEGACY_TARGETS = {"dalg.models.dalg.DALG": "dalg.models.composer.DALG"}


def _yaml_stems(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml"))


def model_names() -> list[str]:
    """Every whole-model config name (``dalg_cross``, ``dolg_r50``, ``dalg_tiny``, ...)."""
    return _yaml_stems(CONFIG_DIR)


def config_groups() -> list[str]:
    """The config groups of a model (``backbone``, ``fusion``, ``global_branch``, ``head``, ``local_branch``)."""
    return sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and _yaml_stems(p))


def group_options(group: str) -> list[str]:
    """The options of one config group, e.g. ``group_options("fusion")``."""
    if group not in config_groups():
        raise ValueError(f"no model config group {group!r}; the groups are {config_groups()}")
    return _yaml_stems(CONFIG_DIR / group)


def fusion_names() -> list[str]:
    """The fusion variants, one per ``conf/model/fusion/*.yaml`` (``model/fusion=<name>``)."""
    return group_options("fusion")


def fusion_name_by_class() -> dict[str, str]:
    """Fusion class name (the ``_target_``'s last part, e.g. ``CrossAttentionFusion``) -> its config name."""
    out = {}
    for name in fusion_names():
        target = OmegaConf.load(CONFIG_DIR / "fusion" / f"{name}.yaml").get("_target_")
        if target:
            out[str(target).rsplit(".", 1)[-1]] = name
    return out


@contextmanager
def _own_hydra() -> Iterator[None]:
    """Hydra's compose API needs the global Hydra instance; inside a running Hydra app (train.py) it is taken,
    so the app's is set aside while the model config is composed and put back afterwards."""
    from hydra.core.global_hydra import GlobalHydra

    saved = GlobalHydra.instance().hydra
    GlobalHydra.instance().clear()
    try:
        yield
    finally:  # initialize_config_dir replaces the singleton on exit: look it up again
        GlobalHydra.instance().clear()
        if saved is not None:
            GlobalHydra.instance().initialize(saved)


def model_config(name: str, pretrained: bool | None = False, **overrides: Any) -> DictConfig:
    """The composed config of model ``name`` with ``overrides`` applied (see the module docstring).
    ``pretrained`` sets ``backbone.pretrained``; None keeps the config's own choice."""
    from hydra import compose, initialize_config_dir

    if name not in model_names():
        raise ValueError(f"unknown model {name!r}; the model configs are {model_names()}")
    groups = set(config_groups())
    choices, values = [], {}
    for key, value in overrides.items():
        if key in groups and isinstance(value, str):
            if value not in group_options(key):
                raise ValueError(f"create_model: {key}={value!r} is not one of {group_options(key)}")
            choices.append(f"{key}={value}")
        else:
            values[key] = value
    with _own_hydra(), initialize_config_dir(config_dir=str(CONFIG_DIR.absolute()), version_base="1.3"):
        cfg = compose(config_name=name, overrides=choices)
    if pretrained is not None:
        values = {"backbone.pretrained": bool(pretrained), **values}
    for key, value in values.items():
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if not isinstance(node, DictConfig) or leaf not in node:
            known = sorted(node) if isinstance(node, DictConfig) else []
            raise ValueError(
                f"create_model({name!r}): no key {key!r} in the model config"
                + (f"; {parent or 'the top level'} has {known}" if known else "")
            )
        OmegaConf.update(cfg, key, value, merge=True)
    return cfg


def instantiate_model(model_cfg: Mapping[str, Any], num_classes: int = 0) -> Any:
    """The network a (resolved or composed) model config describes; ``num_classes > 0`` adds its margin head.
    The one place model configs become modules: the Lightning module, the tools and ``create_model``."""
    import hydra

    cfg = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else model_cfg
    cfg = dict(cfg)
    target = cfg.get("_target_")
    cfg["_target_"] = LEGACY_TARGETS.get(target, target)
    return hydra.utils.instantiate(cfg, num_classes=num_classes)


def create_model(name: str, pretrained: bool | None = False, num_classes: int = 0, **overrides: Any) -> Any:
    """Model ``name`` built from its packaged config; random weights unless ``pretrained`` (timm's default),
    a margin head over ``num_classes`` when > 0. Overrides: see the module docstring."""
    return instantiate_model(model_config(name, pretrained, **overrides), num_classes)
