"""The validation callback: rank every evaluation set with FAISS and score it with the revisited protocol.

Per evaluation set (one validation dataloader each, ``trainer.datamodule.eval_sets``):

1. ``validation_step`` returns ``{"descriptors", "index"}``; the callback keeps them per dataloader.
2. At the end of the epoch every process's descriptors are gathered (:func:`gather_by_index`): placed by
   dataset index, duplicates from a padding sampler (``DistributedSampler``) dropped, a missing image an error.
3. :func:`dalg.retrieval.evaluation.rank_and_score` ranks queries against the database and scores it.
4. ``val/<set>/mAP_E|M|H`` and ``val/<set>/mP@k_<setup>`` are logged (to every logger), a table is printed,
   and a PNG grid of the top results is written and sent to every logger that takes images (W&B, TensorBoard;
   the CSV logger gets the file copied into its log folder).
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn
from pytorch_lightning.utilities.warnings import PossibleUserWarning

from dalg.data.transforms import describe_test_size
from dalg.retrieval.evaluation import RankingOptions, rank_and_score
from dalg.retrieval.metrics import RevisitedScores
from dalg.retrieval.torchmetric import assemble_by_index
from dalg.retrieval.viz import result_grid
from dalg.utils.tables import print_scores_table

log = logging.getLogger(__name__)

# Our val/<set>/mAP_* and mP@* values are computed from the gathered set and identical on every process, so
# Lightning's "use sync_dist=True" advice does not apply to them (and only to them).
warnings.filterwarnings(
    "ignore",
    message=r"It is recommended to use `self\.log\('val/[^']+/(mAP|mP@)",
    category=PossibleUserWarning,
)


def _all_gather_rows(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Concatenate a 1-D or 2-D tensor from every process in rank order; row counts may differ, and a process
    with no rows may hold a placeholder width (the widest one is used)."""
    world = dist.get_world_size()
    t = t.to(device)
    shape = torch.tensor([t.shape[0], t.shape[1] if t.ndim == 2 else 0], device=device, dtype=torch.long)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    most = int(max(s[0].item() for s in shapes))
    width = int(max(s[1].item() for s in shapes))
    padded = torch.zeros((most, width) if t.ndim == 2 else (most,), dtype=t.dtype, device=device)
    if t.shape[0]:
        padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s[0].item())] for p, s in zip(parts, shapes)]).cpu()


def gather_by_index(
    index: torch.Tensor, desc: torch.Tensor, n: int, device: torch.device | str = "cpu"
) -> np.ndarray:
    """All descriptors of a set, in dataset order ``0..n-1``, from every process.

    Under ``torch.distributed`` each process contributes what it extracted; repeated indices (the padding of
    ``DistributedSampler``) collapse to one, and a missing index raises. ``device`` is where the collective
    runs (the module's device: NCCL needs CUDA tensors, gloo takes CPU ones).
    """
    index = index.reshape(-1).long()
    desc = desc.float()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        index = _all_gather_rows(index, device)
        desc = _all_gather_rows(desc, device)
    return assemble_by_index(index, desc, n)


class DescriptorBuffer:
    """The ``{"index", "descriptors"}`` that ``validation_step`` returns, kept on the CPU per dataloader (= per
    evaluation set). Outputs that are not descriptors (``None``: the classification hold-out) are skipped."""

    def __init__(self) -> None:
        self._chunks: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)

    def add(self, outputs, dataloader_idx: int = 0) -> None:
        if not outputs:
            return
        self._chunks[dataloader_idx].append(
            (outputs["index"].detach().cpu(), outputs["descriptors"].detach().cpu())
        )

    def has(self, dataloader_idx: int) -> bool:
        return bool(self._chunks.get(dataloader_idx))

    def tensors(self, dataloader_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(index, descriptors)`` of one dataloader; empty ``(0,)`` / ``(0, D)`` tensors when it gave none."""
        chunks = self._chunks.get(dataloader_idx, [])
        if not chunks:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, 1)
        return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])

    def clear(self) -> None:
        self._chunks.clear()


class RetrievalEvalCallback(pl.Callback):
    """Scores every evaluation set after each validation epoch; ``results`` holds the last scores per set.

    Args:
        grid_queries / grid_top_k / grid_setup: rows, columns and the setup (E/M/H) whose labels colour the
            result grid's borders; ``grid_queries=0`` turns the grid off.
        output_dir: where the grid PNGs go (default ``<default_root_dir>/retrieval``).
        ranking: options of :class:`dalg.retrieval.evaluation.RankingOptions` (default: full ranking).
        keep_features: keep the gathered descriptors of the last epoch in ``features[name]`` (queries first).
    """

    def __init__(
        self,
        grid_queries: int = 4,
        grid_top_k: int = 10,
        grid_setup: str = "M",
        output_dir: str | None = None,
        ranking: dict | None = None,
        keep_features: bool = False,
    ):
        self.grid_queries = grid_queries
        self.grid_top_k = grid_top_k
        self.grid_setup = grid_setup
        self.output_dir = output_dir
        self.ranking = RankingOptions.from_mapping(ranking)
        self.results: dict[str, RevisitedScores] = {}
        self.protocols: dict[str, dict] = {}
        self.last_grid: Path | None = None
        self.keep_features = keep_features
        self.features: dict[str, np.ndarray] = {}
        self._buffer = DescriptorBuffer()

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._buffer.clear()

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ):
        self._buffer.add(outputs, dataloader_idx)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            self._buffer.clear()
            return
        eval_sets = trainer.datamodule.eval_sets
        for i, eval_set in enumerate(eval_sets):
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
            scores, ranks, protocol = self._rank_and_score_once(trainer, feats, eval_set)
            protocol.update(
                crop_queries=eval_set.crop_queries, test_size=describe_test_size(eval_set.test_size)
            )
            self.results[eval_set.name] = scores
            self.protocols[eval_set.name] = protocol
            for key, value in scores.as_dict().items():
                # identical on every process (broadcast from rank 0): no reduction needed (a mean over 3
                # processes would not even return the same float); Lightning's advice to sync is muted above
                pl_module.log(
                    f"val/{eval_set.name}/{key}", float(value), add_dataloader_idx=False, sync_dist=False
                )
            self._write_grid(trainer, eval_set, ranks)
        self._buffer.clear()
        if self.results and trainer.is_global_zero:
            print_scores_table(
                self.results,
                title=f"retrieval after epoch {trainer.current_epoch} (step {trainer.global_step})",
                options={
                    name: f"crop={'on' if p['crop_queries'] else 'OFF'}, size={p['test_size']}, {p['ranking']}"
                    for name, p in self.protocols.items()
                },
            )

    def _rank_and_score_once(self, trainer: pl.Trainer, feats: np.ndarray, eval_set):
        """Search and score on global rank 0 only; under DDP the other processes receive its scores and protocol
        (not N copies of the same search). ``ranks`` stay on rank 0, the only one that draws grids. An error on
        rank 0 is re-raised everywhere, so that no process waits forever in the broadcast."""
        nq = eval_set.gt.n_queries
        result, error = None, None
        if trainer.is_global_zero:
            try:
                result = rank_and_score(feats[:nq], feats[nq:], eval_set.gt.gnd, options=self.ranking)
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
    def _write_grid(self, trainer: pl.Trainer, eval_set, ranks: np.ndarray | None) -> None:
        if self.grid_queries <= 0 or ranks is None:
            return
        out_dir = Path(self.output_dir or os.path.join(trainer.default_root_dir, "retrieval"))
        out_dir.mkdir(parents=True, exist_ok=True)
        n = eval_set.gt.n_queries
        queries = np.linspace(0, n - 1, min(self.grid_queries, n)).round().astype(int).tolist()
        grid = result_grid(eval_set.dataset, ranks, queries, self.grid_top_k, self.grid_setup)
        name = f"{eval_set.name}_epoch{trainer.current_epoch:03d}_step{trainer.global_step:06d}.png"
        path = out_dir / name
        tmp = path.with_suffix(".tmp.png")
        grid.save(tmp)
        os.replace(tmp, path)
        self.last_grid = path
        key = f"val/{eval_set.name}/top{self.grid_top_k}_{self.grid_setup}"
        for logger in trainer.loggers:
            log_image_to(logger, key, path, grid, trainer.global_step)


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
