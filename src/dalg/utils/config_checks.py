"""Config errors found before any data is read or any step is trained, each naming the key and what is allowed."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from dalg.utils.config import REPO_ROOT

RESUME_MODES = ("auto", "never")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and the allowed values."""


def fusion_choices(conf_dir: Path = REPO_ROOT / "conf") -> dict[str, str]:
    """``{name: _target_}`` of the shipped fusion configs (``conf/model/fusion/<name>.yaml``)."""
    from omegaconf import OmegaConf

    return {
        p.stem: str(OmegaConf.load(p).get("_target_"))
        for p in sorted((conf_dir / "model" / "fusion").glob("*.yaml"))
    }


def check_fusion(cfg: DictConfig) -> None:
    fusion = cfg.get("model", {}).get("fusion")
    if fusion is None:
        return
    choices = fusion_choices()
    target = fusion.get("_target_")
    if target not in choices.values():
        raise ConfigError(
            f"model.fusion._target_={target!r} is not a known fusion; allowed: model/fusion="
            f"{{{','.join(choices)}}} ({', '.join(sorted(set(choices.values())))})"
        )


def check_paths(cfg: DictConfig) -> None:
    data = cfg.data
    root = data.get("root")
    if (
        root is not None
        and data.get("generator") is None
        and not Path(os.path.expanduser(str(root))).is_dir()
    ):
        raise ConfigError(
            f"data.root={root} does not exist: set data.root=<folder with {data.get('csv_name')}> "
            f"(or data=synthetic for the generated set)"
        )
    for name, node in (data.get("eval_sets") or {}).items():
        if node is None:
            continue
        # the typed spec (dalg.data.eval_spec.EvalSetSpec, by its _target_) knows which files define the set
        spec = hydra.utils.instantiate(node, _convert_="all")
        if not callable(getattr(spec, "definition_files", None)):
            raise ConfigError(
                f"data.eval_sets.{name} is not an evaluation-set spec: give it a _target_ "
                f"(dalg.data.revisited.RevisitedSet or dalg.data.folder.QueryCsvSet, see conf/data/eval/*.yaml)"
            )
        files = spec.definition_files()
        generated = data.get("generator") is not None and all(
            str(p).startswith(str(root)) for p in files.values()
        )
        missing = spec.missing()
        if spec.required and not generated and missing:
            raise ConfigError(
                f"data.eval_sets.{name}: {missing} (required: true); point the set at its files "
                f"({', '.join(f'{k}: {p}' for k, p in files.items())})"
            )


def check_image_sizes(cfg: DictConfig, stride: int) -> None:
    """Train and test sizes must be multiples of the backbone's patch size / stride ``stride``; a test size may
    also be null / "original" (each image's own size, its sides rounded to multiples of the patch size)."""
    from dalg.utils.sizes import parse_test_size

    data = cfg.data
    sizes = {"data.train_size": data.get("train_size")}
    for n, s in (data.get("eval_sets") or {}).items():
        if s is None:
            continue
        key = f"data.eval_sets.{n}.test_size"
        try:
            sizes[key] = parse_test_size(s.get("test_size"), key)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    for key, size in sizes.items():
        if size is not None and int(size) % stride:
            lo, hi = int(size) // stride * stride, (int(size) // stride + 1) * stride
            raise ConfigError(
                f"{key}={size} is not a multiple of the backbone's patch size {stride}: allowed are "
                f"multiples of {stride}, e.g. {lo or stride} or {hi}"
            )


def check_wandb(cfg: DictConfig) -> None:
    """An online W&B logger without credentials would prompt for a key; fail instead, with the two fixes."""
    wb = (cfg.get("logger") or {}).get("wandb")
    if wb is None or wb.get("offline", False) or os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return
    if os.environ.get("WANDB_API_KEY"):
        return
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1]
        if netrc.netrc().authenticators(host):
            return
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    raise ConfigError(
        "logger.wandb.offline=false needs W&B credentials (WANDB_API_KEY or `wandb login`); "
        "allowed: logger.wandb.offline=true (default, sync later with `wandb sync`) or set the key"
    )


def check_run_options(cfg: DictConfig) -> None:
    if cfg.get("resume", "auto") not in RESUME_MODES:
        raise ConfigError(
            f"resume={cfg.get('resume')!r}; allowed: {', '.join(RESUME_MODES)} "
            f"(or ckpt_path=<file> for an explicit checkpoint)"
        )
    ckpt = cfg.get("ckpt_path")
    if ckpt is not None and not Path(str(ckpt)).is_file():
        raise ConfigError(f"ckpt_path={ckpt} does not exist")


def check_backbone_weights(cfg: DictConfig) -> None:
    """The backbone's initial weights can be had now: its checkpoint file exists, or (pretrained=true) timm's
    weights are cached or downloadable. Offline, this fails in seconds instead of at model build time."""
    backbone = (cfg.get("model") or {}).get("backbone")
    if backbone is None:
        return
    ckpt = backbone.get("checkpoint")
    if ckpt:
        if not Path(os.path.expanduser(str(ckpt))).is_file():
            raise ConfigError(
                f"model.backbone.checkpoint={ckpt} does not exist; give a state dict, .safetensors or "
                f".ckpt file, or model.backbone.checkpoint=null"
            )
        return
    if backbone.get("pretrained"):
        from dalg.models.pretrained import PretrainedWeightsUnavailable, locate_pretrained

        try:
            locate_pretrained(str(backbone.name))
        except PretrainedWeightsUnavailable as e:
            raise ConfigError(str(e)) from None


def check_training_batches(num_images: int, batch_size: int, world_size: int = 1) -> None:
    """The training loader drops the last incomplete batch on each process, so a job whose processes each get
    fewer images than ``data.batch_size`` would train nothing and still exit 0 (an empty sweep cell)."""
    per_process = -(-num_images // max(1, world_size))  # each process's share, padded as the sampler pads it
    if per_process < batch_size:
        over = f" over {world_size} processes ({per_process} each)" if world_size > 1 else ""
        raise ConfigError(
            f"data.batch_size={batch_size} is larger than the {num_images} training images{over}: "
            f"not one training batch (incomplete batches are dropped). Allowed: data.batch_size <= "
            f"{per_process}, or more training images"
        )


# numeric config values: (key, kind, low, high, null allowed). Kinds: int (rejects "abc", 2.5 and true alike),
# float, positive (> 0), batches (Lightning's limit_*: a fraction in [0, 1] or a count)
_NUMBERS = (
    ("seed", "int", None, None, False),
    ("optim.optimizer.lr", "positive", None, None, False),
    ("optim.optimizer.momentum", "float", 0.0, 1.0, True),
    ("optim.weight_decay", "float", 0.0, None, True),
    ("optim.warmup_epochs", "float", 0.0, None, True),
    ("optim.min_lr_ratio", "float", 0.0, 1.0, True),
    ("optim.layer_decay", "float", 0.0, 1.0, True),
    ("trainer.max_epochs", "int", -1, None, True),
    ("trainer.min_epochs", "int", 0, None, True),
    ("trainer.max_steps", "int", -1, None, True),
    ("trainer.accumulate_grad_batches", "int", 1, None, True),
    ("trainer.check_val_every_n_epoch", "int", 1, None, True),
    ("trainer.log_every_n_steps", "int", 0, None, True),
    ("trainer.gradient_clip_val", "float", 0.0, None, True),
    ("trainer.limit_train_batches", "batches", 0, None, True),
    ("trainer.limit_val_batches", "batches", 0, None, True),
    ("data.batch_size", "int", 1, None, True),
    ("data.eval_batch_size", "int", 1, None, True),
    ("data.num_workers", "int", 0, None, True),
    ("data.train_size", "int", 1, None, True),
    ("data.min_images_per_class", "int", 1, None, True),
    ("data.val_fraction", "float", 0.0, 1.0, True),
    ("data.max_pixels", "int", 1, None, True),
    ("data.max_unreadable_fraction", "float", 0.0, 1.0, True),
    ("data.unreadable_check_after", "int", 1, None, True),
)


def _number_error(value: object, kind: str, low: float | None, high: float | None) -> str | None:
    """What is wrong with ``value`` for a number of ``kind`` in [low, high], or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"is not a number ({type(value).__name__})"
    if kind == "int" and not isinstance(value, int):
        return "must be an integer"
    if kind == "batches" and isinstance(value, float) and not 0.0 <= value <= 1.0:
        return "must be a fraction in [0, 1] (float) or a number of batches (int)"
    if kind == "positive" and not value > 0:
        return "must be > 0"
    if value != value or (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        return f"must be {bounds}"
    return None


def check_numbers(cfg: DictConfig) -> None:
    """Numeric values of the known keys have the right type and range (a negative lr, ``max_epochs=abc``), so they
    fail here instead of after the data was read and the untrained model evaluated."""
    from omegaconf import OmegaConf

    for key, kind, low, high, nullable in _NUMBERS:
        node = OmegaConf.select(cfg, key, default="<absent>")
        if node == "<absent>" or (node is None and nullable):
            continue
        problem = _number_error(node, kind, low, high)
        if problem:
            raise ConfigError(f"{key}={node!r} {problem}")


def backbone_stride(cfg: DictConfig) -> int | None:
    """The backbone's patch size / stride from the config alone (timm ViT names carry ``patch<N>``; the ResNet
    taps have stride 16), so sizes are checked before any data is read; None when the config does not tell."""
    import re

    backbone = (cfg.get("model") or {}).get("backbone") or {}
    target = str(backbone.get("_target_", ""))
    if target.endswith("ResNetBackbone"):
        return 16
    if backbone.get("patch_size"):
        return int(backbone.get("patch_size"))
    found = re.search(r"patch(\d+)", str(backbone.get("name", "")))
    return int(found.group(1)) if found else None


def check_before_data(cfg: DictConfig) -> None:
    check_numbers(cfg)
    check_run_options(cfg)
    check_fusion(cfg)
    check_paths(cfg)
    check_wandb(cfg)
    stride = backbone_stride(cfg)
    if stride:  # checked again with the built model's own stride (train_pipeline)
        check_image_sizes(cfg, stride)
    check_backbone_weights(cfg)
