"""The retrieval DataModule: a classification training set (GLDv2 layout) and Revisited-format evaluation sets."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from dalg.data.gldv2 import GLDv2Dataset
from dalg.data.revisited import RevisitedGroundTruth, RevisitedImages, load_ground_truth
from dalg.data.sampling import SizeBucketBatchSampler
from dalg.data.transforms import eval_transform, resized_shape, train_transform

log = logging.getLogger(__name__)


@dataclass
class EvalSet:
    """One Revisited-format evaluation set as the retrieval callback sees it."""

    name: str
    gt: RevisitedGroundTruth
    dataset: RevisitedImages  # queries first, then the database
    test_size: int
    crop_queries: bool


class RetrievalDataModule(pl.LightningDataModule):
    """Train on ``root`` (GLDv2 layout, optional), evaluate on every set in ``eval_sets``.

    ``eval_sets`` maps a name to ``{data_dir, gnd_name, test_size, crop_queries, required}``. An optional set
    whose ground truth is absent (e.g. ``../shared`` missing in a user's clone) is skipped with one warning.
    ``generator`` (optional) is called as ``generator(root=root)`` in ``prepare_data`` to create the data first.
    ``monitor_set`` names the set whose ``mAP_M`` selects checkpoints (the config's ``optimized_metric``).
    """

    def __init__(self, root: str | None = None, csv_name: str = "train_clean.csv", train_size: int = 512,
                 train_scale: tuple[float, float] = (0.08, 1.0), color_jitter: float = 0.2,
                 min_images_per_class: int = 1, batch_size: int = 64, num_workers: int = 4,
                 eval_sets: Mapping[str, Mapping] | None = None, eval_batch_size: int = 32,
                 generator: Callable[..., object] | None = None, pin_memory: bool = False,
                 monitor_set: str | None = None):
        super().__init__()
        self.root = root
        self.csv_name = csv_name
        self.train_size = train_size
        self.train_scale = tuple(train_scale)
        self.color_jitter = color_jitter
        self.min_images_per_class = min_images_per_class
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.eval_specs = dict(eval_sets or {})
        self.eval_batch_size = eval_batch_size
        self.generator = generator
        self.pin_memory = pin_memory
        self.monitor_set = monitor_set  # the evaluation set whose mAP_M selects checkpoints
        self.train_set: GLDv2Dataset | None = None
        self.eval_sets: list[EvalSet] = []
        self.skipped_eval_sets: dict[str, str] = {}

    # ------------------------------------------------------------------------------------------ setup
    def prepare_data(self) -> None:
        if self.generator is not None:
            self.generator(root=self.root)

    def setup(self, stage: str | None = None) -> None:
        if self.root is not None and self.train_set is None and stage in (None, "fit"):
            tf = train_transform(self.train_size, self.train_scale, color_jitter=self.color_jitter)
            self.train_set = GLDv2Dataset(self.root, self.csv_name, tf, self.min_images_per_class)
        if not self.eval_sets:
            self.eval_sets = [s for s in (self._load_eval_set(n, spec) for n, spec in self.eval_specs.items()) if s]

    def _load_eval_set(self, name: str, spec: Mapping) -> EvalSet | None:
        data_dir = Path(os.path.expanduser(str(spec["data_dir"])))
        gnd_name = spec.get("gnd_name", name)
        if not (data_dir / f"gnd_{gnd_name}.pkl").is_file() and not spec.get("required", False):
            reason = f"{data_dir / f'gnd_{gnd_name}.pkl'} not found"
            if name not in self.skipped_eval_sets:
                log.warning("evaluation set %s skipped: %s (set data.eval_sets.%s.data_dir)", name, reason, name)
                self.skipped_eval_sets[name] = reason
            return None
        gt = load_ground_truth(data_dir, gnd_name)
        test_size = int(spec.get("test_size", 512))
        crop = bool(spec.get("crop_queries", True))
        return EvalSet(name, gt, RevisitedImages(gt, eval_transform(test_size), crop), test_size, crop)

    @property
    def num_classes(self) -> int:
        if self.train_set is None:
            raise RuntimeError("num_classes needs a training set: call setup('fit') with data.root set")
        return self.train_set.num_classes

    def save_label_map(self, directory: str | os.PathLike) -> Path:
        """Write ``label_map.json`` ({original landmark id: label}) atomically into ``directory``."""
        if self.train_set is None:
            raise RuntimeError("no training set, so no label map")
        out = Path(directory) / "label_map.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.train_set.label_map, indent=0))
        os.replace(tmp, out)
        return out

    # ------------------------------------------------------------------------------------ dataloaders
    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise RuntimeError("no training set configured (data.root is null)")
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0)

    def eval_dataloader(self, eval_set: EvalSet) -> DataLoader:
        ds = eval_set.dataset
        sizes = [resized_shape(*ds.source_size(i), eval_set.test_size) for i in range(len(ds))]
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) \
            if torch.distributed.is_available() and torch.distributed.is_initialized() else (0, 1)
        sampler = SizeBucketBatchSampler(sizes, self.eval_batch_size, rank, world)
        return DataLoader(ds, batch_sampler=sampler, num_workers=self.num_workers, pin_memory=self.pin_memory)

    def val_dataloader(self) -> list[DataLoader]:
        return [self.eval_dataloader(s) for s in self.eval_sets]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()
