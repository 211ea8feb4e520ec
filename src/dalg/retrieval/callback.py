"""The validation callback: rank every evaluation set with FAISS and score it with the revisited protocol."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from dalg.retrieval.index import search
from dalg.retrieval.metrics import RevisitedScores, evaluate_revisited
from dalg.retrieval.viz import result_grid
from dalg.utils.tables import print_scores_table

log = logging.getLogger(__name__)


def gather_by_index(pl_module: pl.LightningModule, index: torch.Tensor, desc: torch.Tensor, n: int) -> np.ndarray:
    """All descriptors of a set, in dataset order, from every process; each index must appear (duplicates from
    padded samplers are identical and collapse)."""
    if pl_module.trainer.world_size > 1:
        count = torch.tensor([len(index)], device=pl_module.device)
        most = int(pl_module.all_gather(count).max())
        pad = most - len(index)
        index = torch.cat([index, index.new_full((pad,), -1)])
        desc = torch.cat([desc, desc.new_zeros((pad, desc.shape[1]))])
        index = pl_module.all_gather(index.to(pl_module.device)).reshape(-1).cpu()
        desc = pl_module.all_gather(desc.to(pl_module.device)).reshape(-1, desc.shape[-1]).cpu()
        keep = index >= 0
        index, desc = index[keep], desc[keep]
    out = np.zeros((n, desc.shape[1]), np.float32)
    seen = np.zeros(n, bool)
    idx = index.numpy()
    out[idx] = desc.numpy()
    seen[idx] = True
    if not seen.all():
        raise RuntimeError(f"descriptors missing for {int((~seen).sum())} of {n} images "
                           f"(first indices {np.flatnonzero(~seen)[:5].tolist()})")
    return out


class RetrievalEvalCallback(pl.Callback):
    """Collects ``validation_step`` descriptors, then per evaluation set: exact search of queries against the
    database, revisited mAP (E/M/H) and mP@k, a printed table, ``val/<set>/<metric>`` logged to every logger,
    and a PNG grid of the top results of a few queries (also sent to W&B)."""

    def __init__(self, grid_queries: int = 4, grid_top_k: int = 10, grid_setup: str = "M",
                 output_dir: str | None = None):
        self.grid_queries = grid_queries
        self.grid_top_k = grid_top_k
        self.grid_setup = grid_setup
        self.output_dir = output_dir
        self.results: dict[str, RevisitedScores] = {}
        self._buffers: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._buffers.clear()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        self._buffers[dataloader_idx].append((outputs["index"].detach().cpu(), outputs["descriptors"].detach().cpu()))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        eval_sets = trainer.datamodule.eval_sets
        for i, eval_set in enumerate(eval_sets):
            chunks = self._buffers.get(i, [])
            if not chunks:
                continue
            index = torch.cat([c[0] for c in chunks])
            desc = torch.cat([c[1] for c in chunks])
            feats = gather_by_index(pl_module, index, desc, len(eval_set.dataset))
            nq = eval_set.gt.n_queries
            _, ranks = search(feats[:nq], feats[nq:])
            scores = evaluate_revisited(ranks, eval_set.gt.gnd)
            self.results[eval_set.name] = scores
            for key, value in scores.as_dict().items():
                pl_module.log(f"val/{eval_set.name}/{key}", float(value), add_dataloader_idx=False)
            self._write_grid(trainer, eval_set, ranks)
        self._buffers.clear()
        if self.results and trainer.is_global_zero:
            print_scores_table(self.results, title=f"retrieval after epoch {trainer.current_epoch} "
                                                   f"(step {trainer.global_step})",
                               options={s.name: f"test_size={s.test_size}, crop_queries={s.crop_queries}"
                                        for s in eval_sets})

    @rank_zero_only
    def _write_grid(self, trainer: pl.Trainer, eval_set, ranks: np.ndarray) -> None:
        if self.grid_queries <= 0:
            return
        out_dir = Path(self.output_dir or os.path.join(trainer.default_root_dir, "retrieval"))
        out_dir.mkdir(parents=True, exist_ok=True)
        n = eval_set.gt.n_queries
        queries = np.linspace(0, n - 1, min(self.grid_queries, n)).round().astype(int).tolist()
        grid = result_grid(eval_set.dataset, ranks, queries, self.grid_top_k, self.grid_setup)
        path = out_dir / f"{eval_set.name}_epoch{trainer.current_epoch:03d}_step{trainer.global_step:06d}.png"
        tmp = path.with_suffix(".tmp.png")
        grid.save(tmp)
        os.replace(tmp, path)
        self.last_grid = path
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=f"val/{eval_set.name}/top{self.grid_top_k}", images=[str(path)],
                                 step=trainer.global_step)
