"""The evaluation engine's Lightning side: after each validation, rank and score every evaluation set.

Used by training (after every epoch) and by ``src/eval.py`` (``trainer.validate`` with this callback). Per
evaluation set (one validation dataloader each, ``trainer.datamodule.eval_sets``):

1. ``validation_step`` returns ``{"descriptors", "index"}``; they are kept per dataloader
   (:class:`dalg.retrieval.gather.DescriptorBuffer`).
2. At the end of the epoch every process's descriptors are gathered in dataset order
   (:func:`dalg.retrieval.gather.gather_by_index`).
3. :func:`dalg.retrieval.evaluation.rank_and_score` ranks queries against the database (+ ``distractors``) and
   scores it, on global rank 0; the other processes receive its scores.
4. The :class:`~dalg.retrieval.evaluation.SetResult` of every set is in ``last_results`` (``last_step``: the
   step its metrics were logged at); ``val/<set>/mAP_E|M|H`` and ``val/<set>/mP@k_<setup>`` go to every logger,
   a table is printed, and a PNG grid of the top results is written and sent to every logger that takes images
   (W&B, TensorBoard; the CSV logger gets the file copied into its log folder) at the metrics' step.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn
from pytorch_lightning.utilities.warnings import PossibleUserWarning

from dalg.retrieval.evaluation import RankingOptions, SetResult, print_results, rank_and_score
from dalg.retrieval.gather import DescriptorBuffer, gather_by_index
from dalg.retrieval.metrics import RevisitedScores
from dalg.retrieval.viz import result_grid
from dalg.retrieval.whitening import Whitening, whiten_descriptors
from dalg.utils.atomic import atomic_replace
from dalg.utils.sizes import describe_test_size

log = logging.getLogger(__name__)

# Our val/<set>/mAP_* and mP@* values are computed from the gathered set and identical on every process, so
# Lightning's "use sync_dist=True" advice does not apply to them (and only to them).
warnings.filterwarnings(
    "ignore",
    message=r"It is recommended to use `self\.log\('val/[^']+/(mAP|mP@)",
    category=PossibleUserWarning,
)


def metrics_step(trainer: pl.Trainer) -> int:
    """The step Lightning logs epoch-end metrics at (its logger connector and LearningRateMonitor use it): the
    result grids go to the loggers at this step too, so one validation's metrics and images line up."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


class RetrievalEvalCallback(pl.Callback):
    """Scores every evaluation set after each validation epoch.

    Args:
        grid_queries / grid_top_k / grid_setup: rows, columns and the setup (E/M/H) whose labels colour the
            result grid's borders; ``grid_queries=0`` turns the grid off.
        output_dir: where the grid PNGs go (default ``<default_root_dir>/retrieval``).
        ranking: options of :class:`dalg.retrieval.evaluation.RankingOptions` (default: full ranking).
        kappas: the k of mP@k.
        keep_ranks: places of each query's ranking kept in ``SetResult.ranks`` (at least ``grid_top_k``).
        keep_features: keep the gathered descriptors of the last epoch in ``features[name]`` (queries first).
        distractors: ``(N, D)`` descriptors ranked after every set's own database (src/eval.py ``distractors=``).
        protocol_extra: recorded in every set's protocol (e.g. the test scales and inference options).
        whitening: applied to every set's queries and database before ranking (src/eval.py ``whitening=``;
            the caller whitens ``distractors`` itself, once).
        title: the table's title (default: the epoch and step).
    """

    def __init__(
        self,
        grid_queries: int = 4,
        grid_top_k: int = 10,
        grid_setup: str = "M",
        output_dir: str | None = None,
        ranking: RankingOptions | dict | None = None,
        kappas: Sequence[int] = (1, 5, 10),
        keep_ranks: int = 100,
        keep_features: bool = False,
        distractors: np.ndarray | None = None,
        protocol_extra: dict[str, Any] | None = None,
        title: str | None = None,
        whitening: Whitening | None = None,
    ):
        self.grid_queries = grid_queries
        self.grid_top_k = grid_top_k
        self.grid_setup = grid_setup
        self.output_dir = output_dir
        self.ranking = (
            ranking if isinstance(ranking, RankingOptions) else RankingOptions.from_mapping(ranking)
        )
        self.kappas = tuple(int(k) for k in kappas)
        self.keep_ranks = max(int(keep_ranks), int(grid_top_k))
        self.keep_features = keep_features
        self.distractors = distractors
        self.protocol_extra = dict(protocol_extra or {})
        self.title = title
        self.whitening = whitening
        self.last_results: dict[str, SetResult] = {}
        self.last_step: int | None = None
        self.last_extraction: dict[str, float] | None = None  # images and seconds of the last validation
        self.last_grid: Path | None = None
        self.features: dict[str, np.ndarray] = {}
        self._buffer = DescriptorBuffer()
        self._started = 0.0

    @property
    def results(self) -> dict[str, RevisitedScores]:
        """The scores of the last validation, per set."""
        return {name: r.scores for name, r in self.last_results.items()}

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._buffer.clear()
        self._started = time.perf_counter()

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ):
        self._buffer.add(outputs, dataloader_idx)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            self._buffer.clear()
            return
        # decoding, resizing and the network (the loaders' workers included); gathering and ranking not
        seconds = time.perf_counter() - self._started
        results: dict[str, SetResult] = {}
        step = metrics_step(trainer)
        for i, eval_set in enumerate(trainer.datamodule.eval_sets):
            # every process takes part in the gather, also one whose share of this set was empty
            index, desc = self._buffer.tensors(i)
            if trainer.world_size == 1 and not self._buffer.has(i):
                continue  # this set was not run (e.g. limit_val_batches)
            try:
                feats = gather_by_index(index, desc, len(eval_set.dataset), pl_module.device)
            except RuntimeError as e:  # images missing: fine when validation was cut short on purpose
                if not _validation_is_limited(trainer):
                    raise
                rank_zero_warn(f"{eval_set.name}: not scored, validation is limited ({e})")
                continue
            if self.keep_features:
                self.features[eval_set.name] = feats
            result = self._evaluate_set(trainer, feats, eval_set)
            results[eval_set.name] = result
            for key, value in result.scores.as_dict().items():
                # identical on every process (broadcast from rank 0): no reduction needed (a mean over 3
                # processes would not even return the same float); Lightning's advice to sync is muted above
                pl_module.log(
                    f"val/{eval_set.name}/{key}", float(value), add_dataloader_idx=False, sync_dist=False
                )
            self._write_grid(trainer, eval_set, result.ranks, step)
        self._buffer.clear()
        self.last_results, self.last_step = results, step
        n_images = sum(len(s.dataset) for s in trainer.datamodule.eval_sets if s.name in results)
        self.last_extraction = {"images": n_images, "seconds": seconds}
        if results and trainer.is_global_zero:
            title = (
                self.title or f"retrieval after epoch {trainer.current_epoch} (step {trainer.global_step})"
            )
            print_results(results, title)

    def _evaluate_set(self, trainer: pl.Trainer, feats: np.ndarray, eval_set) -> SetResult:
        nq = eval_set.gt.n_queries
        scores, ranks, protocol = self._rank_and_score_once(trainer, feats, nq, eval_set.gt.gnd)
        protocol.update(
            crop_queries=eval_set.crop_queries,
            test_size=describe_test_size(eval_set.test_size),
            **self.protocol_extra,
        )
        dataset = eval_set.dataset
        return SetResult(
            name=eval_set.name,
            scores=scores,
            ranks=ranks,
            protocol=protocol,
            query_paths=[str(p) for p in dataset.paths[:nq]],
            query_boxes=list(dataset.boxes) if eval_set.crop_queries else None,
            database_paths=[str(p) for p in dataset.paths[nq:]],
            gnd=list(eval_set.gt.gnd),
        )

    def _rank_and_score_once(self, trainer: pl.Trainer, feats: np.ndarray, nq: int, gnd: list[dict]):
        """Search and score on global rank 0 only; under DDP the other processes receive its scores and protocol
        (not N copies of the same search). ``ranks`` stay on rank 0, the only one that draws grids. An error on
        rank 0 is re-raised everywhere, so that no process waits forever in the broadcast."""
        result, error = None, None
        if trainer.is_global_zero:
            try:
                result = rank_and_score(
                    whiten_descriptors(feats[:nq], self.whitening, "queries"),
                    whiten_descriptors(feats[nq:], self.whitening, "database"),
                    gnd,
                    self.distractors,
                    options=self.ranking,
                    kappas=self.kappas,
                    keep_ranks=self.keep_ranks,
                )
            except Exception as e:  # re-raised below, on every process
                error = e
        if trainer.world_size > 1:
            shared = (result[0], result[2]) if result is not None else None
            shared, error = trainer.strategy.broadcast((shared, error), src=0)
            if error is None and not trainer.is_global_zero:
                result = (shared[0], None, shared[1])
        if error is not None:
            raise error
        return result

    @rank_zero_only
    def _write_grid(self, trainer: pl.Trainer, eval_set, ranks: np.ndarray | None, step: int) -> None:
        if self.grid_queries <= 0 or ranks is None:
            return
        out_dir = Path(self.output_dir or os.path.join(trainer.default_root_dir, "retrieval"))
        n = eval_set.gt.n_queries
        queries = np.linspace(0, n - 1, min(self.grid_queries, n)).round().astype(int).tolist()
        grid = result_grid(eval_set.dataset, ranks, queries, self.grid_top_k, self.grid_setup)
        name = f"{eval_set.name}_epoch{trainer.current_epoch:03d}_step{trainer.global_step:06d}.png"
        path = atomic_replace(lambda f: grid.save(f, format="PNG"), out_dir / name)
        self.last_grid = path
        key = f"val/{eval_set.name}/top{self.grid_top_k}_{self.grid_setup}"
        for logger in trainer.loggers:
            log_image_to(logger, key, path, grid, step)


def _validation_is_limited(trainer: pl.Trainer) -> bool:
    """True under fast_dev_run or limit_val_batches < all: then a set cannot be complete and is not scored."""
    limit = trainer.limit_val_batches
    return bool(trainer.fast_dev_run) or not (limit is None or (isinstance(limit, float) and limit >= 1.0))


def log_image_to(logger, key: str, path: Path, image, step: int) -> None:
    """Send a PNG to one logger in the way that logger takes images."""
    if isinstance(logger, WandbLogger):
        logger.log_image(key=key, images=[str(path)], step=step)
    elif isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(key, np.asarray(image), global_step=step, dataformats="HWC")
    elif isinstance(logger, CSVLogger):  # a CSV file holds no image: keep it beside metrics.csv
        dest = Path(logger.log_dir) / "images" / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    elif callable(getattr(logger, "log_image", None)):
        logger.log_image(key=key, images=[str(path)], step=step)
    else:
        log.info("logger %s takes no images; result grid is at %s", type(logger).__name__, path)
