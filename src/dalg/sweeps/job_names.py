"""Short, shell- and Hydra-safe job folder names, and which overrides of a sweep vary.

A job folder is ``<job number>_<tag>`` (``0_fusion-cross_attention``): the tag names the values that vary across
the sweep (all overrides when that is not known), each as ``<last key segment>-<value>``, reduced to the characters
``[A-Za-z0-9._+-]`` and cut to ``MAX_TAG`` characters. The folder holds no ``=``, ``,`` or ``/`` (Hydra's
``override_dirname`` holds all three, so ``model/fusion=...`` split a job into two levels and ``eval.py
ckpt_path=<job>/...`` needed double quoting); the full overrides stay in ``.hydra/overrides.yaml`` and the run's
``run_meta.json``.

Which keys vary is known only to the process that starts the sweep (its command line and ``hydra.sweeper.params``):
the Hydra callback (:mod:`dalg.sweeps.hydra_callback`) records them with :func:`set_varying_keys` in this process
and in ``DALG_SWEEP_VARYING`` for job processes that a launcher starts.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping

from omegaconf import OmegaConf

ENV_VARYING = "DALG_SWEEP_VARYING"
MAX_TAG = 60
# never part of a tag: where things are, not what is compared (same list as the old override_dirname exclusions)
EXCLUDED_KEYS = frozenset(
    {"ckpt_path", "data.root", "paths.log_dir", "run_name", "resume", "launcher", "hparams_search"}
)
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def parse_overrides(overrides: Iterable[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides([str(o) for o in overrides])


def sweep_keys(overrides: Iterable[str], sweeper_params: Mapping | None = None) -> list[str]:
    """Keys that take several values in a sweep: sweep overrides of the command line (``a=1,2``, ``range()``,
    ``choice()``...) and the keys of ``hydra.sweeper.params`` (Optuna's search space)."""
    keys = [o.key_or_group for o in parse_overrides(overrides) if o.is_sweep_override()]
    keys += [str(k) for k in (sweeper_params or {}) if str(k) not in keys]
    return keys


def set_varying_keys(keys: list[str]) -> None:
    os.environ[ENV_VARYING] = json.dumps(list(keys))


def varying_keys() -> list[str] | None:
    """The varying keys of the sweep this process runs a job of; None outside a recorded sweep."""
    raw = os.environ.get(ENV_VARYING)
    if not raw:
        return None
    keys = json.loads(raw)
    if not isinstance(keys, list):
        raise ValueError(f"{ENV_VARYING} must hold a JSON list of override keys, got {raw!r}")
    return [str(k) for k in keys]


def job_overrides(overrides: Iterable[str], keys: list[str] | None = None) -> dict[str, str]:
    """``{key: value}`` of one job's overrides (``hydra.overrides.task``), limited to ``keys`` when given; deletions
    (``~key``) and excluded keys left out."""
    out: dict[str, str] = {}
    for o in parse_overrides(overrides):
        if o.is_delete() or o.key_or_group in EXCLUDED_KEYS:
            continue
        if keys is not None and o.key_or_group not in keys:
            continue
        out[o.key_or_group] = o.input_line.split("=", 1)[1] if "=" in o.input_line else ""
    return out


def safe(text: str) -> str:
    return _UNSAFE.sub("-", text).strip("-")


def tag(overrides: Iterable[str], keys: list[str] | None = None, max_len: int = MAX_TAG) -> str:
    """``fusion-cross_attention_max_epochs-2``: the job's (varying) overrides, short and safe in a path."""
    parts = [
        f"{safe(re.split(r'[./]', key)[-1])}-{safe(value)}"
        for key, value in job_overrides(overrides, keys).items()
    ]
    return "_".join(p for p in parts if p)[:max_len].rstrip("-_.")


def _job_tag(overrides) -> str:
    items = OmegaConf.to_container(overrides) if OmegaConf.is_config(overrides) else list(overrides or [])
    t = tag(items, varying_keys())
    return f"_{t}" if t else ""


def register_resolver() -> None:
    """``${job_tag:${hydra:overrides.task}}`` = ``_<tag>`` (or nothing), used in ``hydra.sweep.subdir``."""
    if not OmegaConf.has_resolver("job_tag"):
        OmegaConf.register_new_resolver("job_tag", _job_tag)


register_resolver()


def current_job() -> dict:
    """This process's Hydra job: ``{"mode", "num", "folder", "overrides", "varying"}`` (``varying``: this job's
    values of the keys the sweep varies); ``{}`` outside ``@hydra.main`` (tests, notebooks)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    multirun = str(hc.mode) == "RunMode.MULTIRUN"
    keys = varying_keys() if multirun else []
    return {
        "mode": "multirun" if multirun else "run",
        "num": int(hc.job.num) if multirun else None,
        "folder": str(hc.runtime.output_dir),
        "overrides": overrides,
        "varying": job_overrides(overrides, keys) if keys is not None else job_overrides(overrides),
    }
