"""Hydra callback (``hydra.callbacks.sweep_summary`` in conf/hydra/default.yaml) for every ``-m`` sweep.

- ``on_multirun_start``: records which override keys vary (command-line sweeps and ``hydra.sweeper.params``), so
  that job folders are tagged with them (:mod:`dalg.sweeps.job_names`) and W&B runs get them as tags;
- ``on_multirun_end``: writes and prints the sweep summary (:mod:`dalg.sweeps.summary`) into the sweep folder.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from dalg.sweeps import job_names

log = logging.getLogger(__name__)


class SweepSummaryCallback(Callback):
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        overrides = OmegaConf.select(config, "hydra.overrides.task", default=[]) or []
        params = OmegaConf.select(config, "hydra.sweeper.params", default=None)
        params = OmegaConf.to_container(params) if params is not None else None
        job_names.set_varying_keys(job_names.sweep_keys(list(overrides), params))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ.pop(job_names.ENV_VARYING, None)  # this process may run something else next
        if not self.enabled:
            return
        sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
        if not sweep_dir.is_dir():
            log.warning("sweep summary: %s does not exist (no job ran)", sweep_dir)
            return
        from dalg.sweeps.summary import write_summary

        try:
            write_summary(sweep_dir)
        except (OSError, ValueError) as e:  # every job has finished: a bad file must not turn the sweep red
            log.error(
                "sweep summary of %s failed: %s (rebuild: make sweep-summary DIR=%s)", sweep_dir, e, sweep_dir
            )
