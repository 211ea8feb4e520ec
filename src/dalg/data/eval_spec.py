"""The typed evaluation-set spec: what one entry of ``data.eval_sets`` holds (conf/data/eval/<set>.yaml).

Every evaluation set is one :class:`EvalSetSpec` subclass, chosen by the config's ``_target_``: the Revisited
layout (:class:`dalg.data.revisited.RevisitedSet`), a folder + queries CSV (:class:`dalg.data.folder.QueryCsvSet`).
A new kind of dataset is one subclass (one file) and one config; the data module, the config checks and the run
metadata only call the methods below. The default test size lives in conf/data/eval/defaults.yaml alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import OmegaConf

if TYPE_CHECKING:
    from dalg.data.revisited import RevisitedGroundTruth


def spec_path(value: object) -> Path:
    return Path(os.path.expanduser(str(value)))


@dataclass(frozen=True, kw_only=True)
class EvalSetSpec:
    """One evaluation set: its test size, query cropping, whether it must exist, and its name in metric keys.

    ``test_size``: the longer image side at test time, or null / ``original`` for each image's own size (parsed
    by :func:`dalg.data.transforms.parse_test_size` where the set's config key is known). ``required``: a set
    whose files are absent is an error (true) or skipped with one warning (false). ``name``: default, its key.
    """

    test_size: int | str | None
    crop_queries: bool = True
    required: bool = True
    name: str | None = None

    def definition_files(self) -> dict[str, Path]:
        """The files that define the set (its ground truth), for run fingerprints: ``{kind: path}``."""
        raise NotImplementedError

    def missing(self) -> str | None:
        """Why the set cannot be read (``"<path> not found"``), or None when its files are there."""
        for path in self.definition_files().values():
            if not path.exists():
                return f"{path} not found"
        return None

    def load(self) -> RevisitedGroundTruth:
        """Read the ground truth (queries, database, positives per query); errors name the file."""
        raise NotImplementedError


def as_spec(key: str, spec: EvalSetSpec | Mapping) -> EvalSetSpec:
    """``spec`` as an :class:`EvalSetSpec`: one already, or a mapping with its ``_target_`` (a config node)."""
    if isinstance(spec, EvalSetSpec):
        return spec
    if OmegaConf.is_config(spec) and issubclass(OmegaConf.get_type(spec) or dict, EvalSetSpec):
        return OmegaConf.to_object(spec)  # Hydra built the spec, and OmegaConf held it as a structured config
    if isinstance(spec, Mapping) and "_target_" in spec:
        import hydra

        built = hydra.utils.instantiate(spec, _convert_="all")
        if isinstance(built, EvalSetSpec):
            return built
    raise ValueError(
        f"data.eval_sets.{key}: expected an evaluation-set spec with a _target_ (conf/data/eval/*.yaml, e.g. "
        f"dalg.data.revisited.RevisitedSet or dalg.data.folder.QueryCsvSet), got {spec!r}"
    )
