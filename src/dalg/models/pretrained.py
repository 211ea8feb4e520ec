"""Where a backbone's pretrained timm weights come from, found without waiting on a network that is not there.

``timm.create_model(name, pretrained=True)`` asks the Hugging Face hub for the weights and, on a machine without a
network, fails only after its HTTP retries and timeouts (or waits on a firewall that drops packets). Training
configs ask for pretrained weights by default, so the question is answered first, quickly:

1. the local Hugging Face cache (or torch hub's, for weights that only have a URL) holds them: timm is pointed at
   that file (``pretrained_cfg_overlay={"file": ...}``) and no request is made;
2. otherwise, unless ``HF_HUB_OFFLINE`` is set, one metadata request with the hub's own metadata timeout
   (``HF_HUB_ETAG_TIMEOUT``, 10 s by default) tells whether timm can download them;
3. otherwise :class:`PretrainedWeightsUnavailable` names the two ways to go on offline.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

# what timm's hub loader looks for in a weights repository (timm.models._hub.load_state_dict_from_hf)
HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights that are neither cached locally nor downloadable now; the message names the fixes."""


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return flag or bool(constants.HF_HUB_OFFLINE)


def _hub_repo(cfg: Any) -> tuple[str, str | None]:
    repo, _, revision = str(cfg.hf_hub_id).partition("@")
    return repo, revision or None


def cached_weights(cfg: Any) -> str | None:
    """The local file holding the weights of timm ``pretrained_cfg`` ``cfg``, or None."""
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, revision = _hub_repo(cfg)
        for filename in [cfg.hf_hub_filename] if cfg.hf_hub_filename else HUB_FILENAMES:
            found = try_to_load_from_cache(repo, filename, revision=revision)
            if isinstance(found, str):  # else None (unknown) or a "known to be absent" marker
                return found
    if cfg.url:
        import torch

        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(cfg.url).path).name
        if path.is_file():
            return str(path)
    return None


def _unreachable(cfg: Any) -> str | None:
    """None when the weights' host answers within the hub's metadata timeout, else why not."""
    from huggingface_hub import constants

    timeout = float(constants.HF_HUB_ETAG_TIMEOUT)
    if cfg.hf_hub_id:
        if _offline():
            return "HF_HUB_OFFLINE is set"
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.errors import HfHubHTTPError

        repo, revision = _hub_repo(cfg)
        url = hf_hub_url(repo, cfg.hf_hub_filename or HUB_FILENAMES[0], revision=revision)
        try:
            get_hf_file_metadata(url, timeout=timeout)
        except HfHubHTTPError:  # the hub answered (e.g. no such file): timm reports what it finds
            return None
        except Exception as e:  # noqa: BLE001 - no answer, whatever the transport library calls it
            return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
        return None
    try:
        urllib.request.urlopen(urllib.request.Request(cfg.url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return None


def unavailable_message(name: str, source: str, reason: str) -> str:
    return (
        f"model.backbone.pretrained=true needs timm's pretrained weights for {name!r} ({source}): they are "
        f"not in the local cache and cannot be downloaded ({reason}). Offline, either give the weights as a "
        f"file, model.backbone.checkpoint=<state dict | .safetensors | .ckpt>, or train from random weights, "
        f"model.backbone.pretrained=false. (Or fill the cache on a machine with a network: python -c "
        f"\"import timm; timm.create_model('{name}', pretrained=True)\", then copy ~/.cache/huggingface.)"
    )


def locate_pretrained(name: str) -> dict[str, str]:
    """timm's ``pretrained_cfg_overlay`` for ``timm.create_model(name, pretrained=True)``: ``{"file": <path>}``
    when the weights are cached locally, ``{}`` when the hub can be reached (timm downloads them). Raises
    :class:`PretrainedWeightsUnavailable` otherwise, within the hub's metadata timeout at most."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)  # `name` or `name.tag`; a bare name means timm's default tag
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise PretrainedWeightsUnavailable(unavailable_message(name, "timm lists none", "no source"))
    cached = cached_weights(cfg)
    if cached:
        return {"file": cached}
    reason = _unreachable(cfg)
    if reason is not None:
        source = f"Hugging Face repo {cfg.hf_hub_id}" if cfg.hf_hub_id else cfg.url
        raise PretrainedWeightsUnavailable(unavailable_message(name, source, reason))
    return {}


def pretrained_kwargs(name: str, pretrained: bool, checkpoint: str | None) -> dict[str, Any]:
    """The weight arguments of ``timm.create_model`` for a backbone config. A ``checkpoint`` wins over
    ``pretrained`` (its weights replace them, so nothing is fetched); cached weights are read from their file."""
    if not pretrained or checkpoint:
        return {"pretrained": False}
    overlay = locate_pretrained(name)
    return {"pretrained": True, "pretrained_cfg_overlay": overlay} if overlay else {"pretrained": True}


def without_weight_source(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """A model config whose backbone starts from random weights (``pretrained=false``, no checkpoint): for
    rebuilding a trained network whose own state dict supplies every weight."""
    backbone = model_cfg.get("backbone")
    if not isinstance(backbone, dict):
        return model_cfg
    return {**model_cfg, "backbone": {**backbone, "pretrained": False, "checkpoint": None}}
