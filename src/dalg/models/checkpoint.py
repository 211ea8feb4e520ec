"""Load a local backbone checkpoint (timm or torch state dict) strictly, with errors that name the file and keys."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

_WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from .safetensors or a torch file (plain, or wrapped under state_dict/model)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt or not a torch file: say which file
            raise ValueError(f"cannot read backbone checkpoint {path}: {e}") from e
    if isinstance(sd, dict):
        for key in _WRAPPER_KEYS:
            if key in sd and isinstance(sd[key], dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"backbone checkpoint {path} does not hold a state dict of tensors")
    return dict(sd)


def _strip_prefixes(sd: dict[str, Tensor], model_keys: set[str]) -> dict[str, Tensor]:
    """The model's own entries out of a state dict that holds them under some key prefix: none (a timm state
    dict), a wrapper's (DDP ``module.``), or the path of the backbone inside a whole network (a training
    checkpoint's ``<...>.backbone.vit.``). The prefix is found, not listed: the one under which the most of the
    model's keys are present; entries outside it are other parts of that network."""
    coverage: dict[str, int] = {}
    for key in sd:
        for i in [-1] + [i for i, ch in enumerate(key) if ch == "."]:
            if key[i + 1 :] in model_keys:
                coverage[key[: i + 1]] = coverage.get(key[: i + 1], 0) + 1
    if not coverage:
        return sd  # nothing in common: reported as missing and unexpected keys
    prefix = max(coverage, key=lambda p: (coverage[p], -len(p)))
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def load_backbone_checkpoint(model: nn.Module, path: str | Path, max_keys: int = 5) -> None:
    """Load `path` into the timm `model` strictly.

    Classifier weights (timm's `pretrained_cfg['classifier']`, absent here because models are built headless)
    are dropped; a ViT position embedding of another grid size is resampled. Anything else that is missing,
    unexpected or of another shape raises a ValueError naming the file and the first offending keys.
    """
    sd = read_state_dict(path)
    own = model.state_dict()
    sd = _strip_prefixes(sd, set(own))
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    sd = {k: v for k, v in sd.items() if k in own or not any(k.startswith(h + ".") for h in heads)}
    if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape:
        sd["pos_embed"] = _resample_pos_embed(model, sd["pos_embed"], own["pos_embed"])
    differences = state_dict_differences(sd, own, max_keys)
    if differences:
        raise ValueError(
            f"backbone checkpoint {path} does not match {type(model).__name__}: " + "; ".join(differences)
        )
    model.load_state_dict(sd, strict=True)


def state_dict_differences(saved: Mapping[str, Any], own: Mapping[str, Tensor], limit: int = 5) -> list[str]:
    """What keeps ``saved`` (a state dict read from a file) from loading into a model whose state dict is
    ``own``: one phrase each for its missing keys, unexpected keys and tensors of another shape (first ``limit``
    named); empty when it loads."""
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    shapes = [
        f"{k}: {tuple(saved[k].shape)} in the file vs {tuple(own[k].shape)} in the model"
        for k in own
        if k in saved and tuple(getattr(saved[k], "shape", ())) != tuple(own[k].shape)
    ]
    kinds = (
        ("missing (weights of the model that the file lacks)", missing),
        ("unexpected (weights in the file that the model lacks)", unexpected),
        ("differ in shape", shapes),
    )
    return [f"{len(keys)} {what}, e.g. {keys[:limit]}" for what, keys in kinds if keys]


def _resample_pos_embed(model: nn.Module, theirs: Tensor, ours: Tensor) -> Tensor:
    from timm.layers import resample_abs_pos_embed

    npt = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    n_theirs, n_ours = theirs.shape[1] - npt, ours.shape[1] - npt
    old, new = int(round(n_theirs**0.5)), int(round(n_ours**0.5))
    if old * old != n_theirs or new * new != n_ours or theirs.shape[-1] != ours.shape[-1]:
        return theirs  # not a square grid of the same width: reported as a shape mismatch
    return resample_abs_pos_embed(theirs, new_size=(new, new), old_size=(old, old), num_prefix_tokens=npt)
