"""Lightning's CSVLogger, except that a resumed run appends to its ``metrics.csv`` instead of deleting it.

Lightning's writer removes an existing ``metrics.csv`` when it starts. After a resume that would lose every row
logged before the kill, so here the file is kept: rows logged at or after the resumed checkpoint's step (the work that
is repeated) are dropped, the header is read back, and new rows are appended under it. Rows are flushed with every
checkpoint, so the rows up to the checkpoint a run resumes from are on disk.
"""

from __future__ import annotations

import csv
import os
from typing import Any

from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.utilities import rank_zero_only

from dalg.utils.atomic import atomic_replace


class _AppendingWriter(ExperimentWriter):
    keep_until_step: int | None = None

    def _check_log_dir_exists(self) -> None:
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = list(reader)
        limit = self.keep_until_step
        if limit is not None:
            rows = [r for r in rows if not r.get("step") or int(float(r["step"])) < limit]

        def write(f) -> None:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)

        atomic_replace(write, self.metrics_file_path, mode="w")
        self.metrics_keys = sorted(header)


class ResumableCSVLogger(CSVLogger):
    """``resume_step``: the global step of the checkpoint a run resumes from; the resumed run logs again from that
    step on, so older rows with step >= resume_step are dropped (None: a fresh run, the file is
    replaced as Lightning does)."""

    def __init__(self, *args: Any, resume_step: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    @rank_zero_only
    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        # flush with every checkpoint: after a kill, the file holds every row up to the checkpoint resumed from
        self.save()

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        if self.resume_step is None:
            self._experiment = ExperimentWriter(log_dir=self.log_dir)
        else:
            writer_cls = type("_Writer", (_AppendingWriter,), {"keep_until_step": self.resume_step})
            self._experiment = writer_cls(log_dir=self.log_dir)
        return self._experiment
