"""The retrieval DataModules: a classification training set (GLDv2 layout or class subfolders) and evaluation
sets in the Revisited layout or given as a folder + queries CSV."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from dalg.data.eval_spec import EvalSetSpec, as_spec
from dalg.data.folder import ImageFolderDataset
from dalg.data.gldv2 import GLDv2Dataset
from dalg.data.image_list import resized_sizes
from dalg.data.images import ImageReadError
from dalg.data.labelled import LabelledImages
from dalg.data.revisited import RevisitedGroundTruth, RevisitedImages, RevisitedSet
from dalg.data.sampling import SizeBucketBatchSampler
from dalg.data.transforms import eval_transform, holdout_transform, parse_test_size, train_transform
from dalg.utils.atomic import write_json_atomic
from dalg.utils.input_config import InputConfig

log = logging.getLogger(__name__)

TRAIN_LAYOUTS = ("gldv2", "folder")


@dataclass
class EvalSet:
    """One Revisited-format evaluation set as the retrieval callback sees it."""

    name: str
    gt: RevisitedGroundTruth
    dataset: RevisitedImages  # queries first, then the database
    test_size: int | None  # longer side; None = each image's own size
    crop_queries: bool


class ReportingDataLoader(DataLoader):
    """A DataLoader that calls ``on_epoch_end()`` in the main process whenever one pass over it ends: exhausted,
    or abandoned early (``limit_train_batches``, an exception) when Lightning drops the iterator.

    The training set uses it to report unreadable images once per epoch, with the total over all workers.
    """

    def __init__(self, *args, on_epoch_end: Callable[[], object] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.on_epoch_end = on_epoch_end

    def __iter__(self) -> Iterator:
        iterator = super().__iter__()
        try:
            yield from iterator
        finally:
            if self.on_epoch_end is not None:
                self.on_epoch_end()


class RetrievalDataModule(pl.LightningDataModule):
    """Train on ``root`` (optional), evaluate on every set in ``eval_sets``.

    Training set (``layout``): ``gldv2`` reads ``<root>/<csv_name>`` (train_clean.csv or train.csv) and
    ``<root>/train/a/b/c/<id>.jpg``; ``folder`` reads ``<root>/<class>/**/<image>``. Classes are relabelled 0..N-1
    in sorted order (``save_label_map`` writes the map beside checkpoints). ``val_fraction`` > 0 holds out that
    share of each class's images (never a class's only image) as ``val_set`` for a classification check.
    ``verify`` = ``exists`` | ``header`` pre-scans the listed files before training. Unreadable images found
    while training are replaced, counted over all DataLoader workers and reported once per epoch (and at
    teardown) with example paths; a class without any readable image is reported by name. Once a loading
    process has tried ``unreadable_check_after`` images, more than ``max_unreadable_fraction`` of them
    unreadable stops training (a wrong root). ``max_pixels`` caps the pixels any image decodes to; JPEGs much
    larger than the training crop or the test size decode at reduced size (``dalg.data.images.load_rgb``).

    ``eval_sets`` maps a key to an evaluation-set spec (:class:`dalg.data.eval_spec.EvalSetSpec`, or its config
    with a ``_target_``: conf/data/eval/*.yaml): the Revisited layout (``RevisitedSet``: data_dir, gnd_name) or
    your own photos (``QueryCsvSet``: images, queries_csv), each with test_size, crop_queries, required and
    name (the name in metric keys; default: its key). An optional set whose files are absent (e.g. ``../shared``
    missing in a user's clone) is skipped with one warning. A ``test_size`` of null (or ``original``) keeps each
    image's own size (the revisited protocol).
    ``generator`` (optional) is called as ``generator(root=root)`` in ``prepare_data`` to create the data first.
    ``monitor_set`` names the set whose ``mAP_M`` selects checkpoints (the config's ``optimized_metric``).
    ``input_config`` (dalg.utils.input_config.InputConfig or its dict) is the model's input normalisation,
    interpolation and size multiple; every transform uses it. The training pipeline builds the data before the
    model (the model needs the number of classes), so it hands the model's config over with
    ``set_input_config`` before any loader is made; without one the ImageNet defaults apply.
    """

    def __init__(
        self,
        root: str | None = None,
        csv_name: str = "train_clean.csv",
        train_size: int = 512,
        train_scale: Sequence[float] = (0.08, 1.0),
        color_jitter: float = 0.2,
        min_images_per_class: int = 1,
        batch_size: int = 64,
        num_workers: int = 4,
        eval_sets: Mapping[str, Mapping] | None = None,
        eval_batch_size: int = 32,
        generator: Callable[..., object] | None = None,
        pin_memory: bool = False,
        monitor_set: str | None = None,
        layout: str = "gldv2",
        verify: str = "none",
        val_fraction: float = 0.0,
        split_seed: int = 0,
        train_ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        input_config: InputConfig | Mapping | None = None,
        max_pixels: int | None = None,
        max_unreadable_fraction: float | None = None,
        unreadable_check_after: int = 1000,
    ):
        super().__init__()
        if layout not in TRAIN_LAYOUTS:
            raise ValueError(f"data.layout must be one of {TRAIN_LAYOUTS}, got {layout!r}")
        self.root = root
        self.csv_name = csv_name
        self.layout = layout
        self.verify = verify
        self.val_fraction = float(val_fraction)
        self.split_seed = split_seed
        self.train_size = train_size
        self.train_scale = tuple(train_scale)
        self.max_pixels = max_pixels  # no image decodes to more pixels (large JPEGs decode at reduced size)
        self.max_unreadable_fraction = (
            max_unreadable_fraction  # loading stops above this unreadable share ...
        )
        self.unreadable_check_after = unreadable_check_after  # ... once this many images were tried
        self.train_ratio = tuple(train_ratio)
        self.hflip = hflip
        self.color_jitter = color_jitter
        self.min_images_per_class = min_images_per_class
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.eval_specs: dict[str, EvalSetSpec] = {}
        for key, spec in (eval_sets or {}).items():
            spec = as_spec(key, spec)
            self.eval_specs[key] = replace(spec, name=str(spec.name or key))
        self.eval_batch_size = eval_batch_size
        self.generator = generator
        self.pin_memory = pin_memory
        self.monitor_set = monitor_set  # the evaluation set whose mAP_M selects checkpoints
        self.train_set: LabelledImages | None = None
        self.val_set: LabelledImages | None = None  # classification hold-out (val_fraction > 0)
        self.full_train_set: LabelledImages | None = None
        self.eval_sets: list[EvalSet] = []
        self.skipped_eval_sets: dict[str, str] = {}
        self._eval_sizes: dict[int, tuple[tuple, list[tuple[int, int]]]] = {}
        self._last_train_epoch: int | None = None
        self._augmented_batches = 0  # batches jittered without a trainer (benchmarks): their index
        self.input_config: InputConfig | None = None
        if input_config is not None:
            self.set_input_config(input_config)

    def set_input_config(self, input_config: InputConfig | Mapping) -> None:
        """Use the model's input config (normalisation, interpolation, size multiple) in every transform,
        also those of sets already set up; call it before any dataloader is made."""
        self.input_config = InputConfig.from_mapping(input_config, where="data input_config")
        self._eval_sizes.clear()
        if self.train_set is not None:
            self.train_set.transform = self._train_transform()
        if self.val_set is not None:
            self.val_set.transform = holdout_transform(self.train_size, self.input_config)
        for eval_set in self.eval_sets:
            eval_set.dataset.transform = eval_transform(eval_set.test_size, self.input_config)

    def _train_transform(self):
        return train_transform(
            self.train_size,
            self.train_scale,
            self.train_ratio,
            self.hflip,
            self.color_jitter,
            self.input_config,
        )

    def setup_evaluation(
        self, input_config: InputConfig | Mapping, crop_queries: bool, test_size: object = None
    ) -> None:
        """Load the evaluation sets only (src/eval.py), with the checkpoint's input config and the evaluation's
        options for every set: ``crop_queries``, and ``test_size`` unless None (``original``: each image's own
        size). Each set was asked for explicitly, so a missing one is an error, not a skip."""
        if self.eval_sets:
            raise RuntimeError("setup_evaluation() must come before setup(): the sets are already loaded")
        self.set_input_config(input_config)
        values: dict[str, object] = {"crop_queries": bool(crop_queries), "required": True}
        if test_size is not None:
            values["test_size"] = parse_test_size(test_size, "test_size")
        self.eval_specs = {key: replace(spec, **values) for key, spec in self.eval_specs.items()}
        self.setup("validate")
        if not self.eval_sets:
            raise ValueError(f"{type(self).__name__} defines no evaluation set (data.eval_sets)")

    # ------------------------------------------------------------------------------------------ setup
    def prepare_data(self) -> None:
        if self.generator is not None:
            self.generator(root=self.root)

    def setup(self, stage: str | None = None) -> None:
        if self.root is not None and self.train_set is None and stage in (None, "fit"):
            self._setup_train()
        if not self.eval_sets:
            self.eval_sets = [
                s for s in (self._load_eval_set(n, spec) for n, spec in self.eval_specs.items()) if s
            ]

    def _setup_train(self) -> None:
        tf = self._train_transform()
        if self.layout == "gldv2":
            full = GLDv2Dataset(self.root, self.csv_name, tf, self.min_images_per_class, verify=self.verify)
        else:
            full = ImageFolderDataset(self.root, tf, self.min_images_per_class, verify=self.verify)
        # one summary per epoch from the main process instead of per-file warnings from every worker
        full.report_each = False
        full.substitute_empty_classes = True
        full.max_pixels = self.max_pixels
        # the smallest random crop (train_scale[0] of the area) still gets train_size pixels from the decoded image
        full.decode_side = self.train_size / max(self.train_scale[0], 1e-6) ** 0.5
        full.max_unreadable_fraction = self.max_unreadable_fraction
        full.unreadable_check_after = self.unreadable_check_after
        self.full_train_set = full
        if self.val_fraction > 0:
            self.train_set, self.val_set = full.split(self.val_fraction, self.split_seed)
            # no random crops when measuring
            self.val_set.transform = holdout_transform(self.train_size, self.input_config)
            log.info(
                "%s: %d training and %d held-out images over %d classes",
                full.source,
                len(self.train_set),
                len(self.val_set),
                full.num_classes,
            )
        else:
            self.train_set = full

    def _load_eval_set(self, key: str, spec: EvalSetSpec) -> EvalSet | None:
        test_size = parse_test_size(spec.test_size, f"data.eval_sets.{key}.test_size")
        reason = spec.missing()
        if reason is not None and not spec.required:
            return self._skip(key, spec.name, reason)
        gt = spec.load()
        images = RevisitedImages(gt, eval_transform(test_size, self.input_config), spec.crop_queries)
        images.max_pixels = self.max_pixels
        images.decode_side = test_size  # test_size None: no reduced decoding
        return EvalSet(spec.name, gt, images, test_size, spec.crop_queries)

    def _skip(self, key: str, name: str, reason: str) -> None:
        if name not in self.skipped_eval_sets:
            log.warning("evaluation set %s skipped: %s (set data.eval_sets.%s)", name, reason, key)
            self.skipped_eval_sets[name] = reason
        return None

    @property
    def num_classes(self) -> int:
        if self.train_set is None:
            raise RuntimeError("num_classes needs a training set: call setup('fit') with data.root set")
        return self.train_set.num_classes

    def save_label_map(self, directory: str | os.PathLike) -> Path:
        """Write ``label_map.json`` ({original class id: label}) atomically into ``directory``."""
        if self.train_set is None:
            raise RuntimeError("no training set, so no label map")
        return write_json_atomic(self.train_set.label_map, Path(directory) / "label_map.json", indent=0)

    # ----------------------------------------------------------------------------------- reporting
    def report_failures(self) -> None:
        """One warning with what is new among the unreadable training images (all workers counted)."""
        if self.full_train_set is not None:
            self.full_train_set.report_failures(log)

    def teardown(self, stage: str) -> None:
        self.report_failures()

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # The epoch-end report also works when the training loader is re-wrapped (e.g. train_pipeline's
        # ResumableLoader builds a new DataLoader and drops ReportingDataLoader's hook): the first training batch
        # of a new epoch reports what the previous epoch found. A few attribute reads per batch.
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training:
            epoch = trainer.current_epoch
            if self._last_train_epoch is not None and epoch != self._last_train_epoch:
                self.report_failures()
            self._last_train_epoch = epoch
        return self._finish_on_device(batch)

    def _finish_on_device(self, batch):
        """uint8 training crops -> colour-jittered, normalised float images (dalg.data.device_augment), here on
        the training device; float batches (hold-out, evaluation) pass through."""
        if not isinstance(batch, (tuple, list)) or not batch:
            return batch
        images = batch[0]
        if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8):
            return batch
        augment = getattr(getattr(self.train_set, "transform", None), "device_augment", None)
        if augment is None:
            raise RuntimeError(
                "a uint8 image batch reached the model, but the training transform has no device_augment "
                "to normalise it"
            )
        generator = torch.Generator(device=images.device)
        generator.manual_seed(self._augment_seed())
        images = augment(images, generator=generator)
        return type(batch)([images, *batch[1:]]) if isinstance(batch, list) else (images, *batch[1:])

    def _augment_seed(self) -> int:
        """The jitter draws of one training batch, from (run seed, rank, index of the batch in the whole fit).

        Stateless on purpose: a run resumed from a checkpoint (mid-epoch included) draws for each batch what the
        uninterrupted run drew, because Lightning restores the batch counter; a generator carried across batches
        would restart from its seed. Ranks seeded alike (seed_everything) still jitter differently."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            rank = trainer.global_rank
            # batches fetched so far in this fit (restored on resume); the current one is counted after its transfer
            index = trainer.fit_loop.epoch_loop.batch_progress.total.ready
        else:
            rank, index = 0, self._augmented_batches
            self._augmented_batches += 1
        mixed = np.random.SeedSequence([torch.initial_seed() % 2**63, rank, index]).generate_state(
            1, np.uint64
        )
        return int(mixed[0]) % 2**63

    # ------------------------------------------------------------------------------------ dataloaders
    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise RuntimeError("no training set configured (data.root is null)")
        return ReportingDataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            on_epoch_end=self.report_failures,
        )

    def classification_val_dataloader(self) -> DataLoader:
        """The held-out images of the training classes (``val_fraction`` > 0), unshuffled."""
        if self.val_set is None:
            raise RuntimeError("no classification hold-out: set data.val_fraction > 0")
        return ReportingDataLoader(
            self.val_set,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            on_epoch_end=self.report_failures,
        )

    def eval_sizes(self, eval_set: EvalSet) -> list[tuple[int, int]]:
        """Resized (height, width) of every image, from headers; every unreadable file named in one error."""
        multiple = self.input_config.size_multiple if self.input_config is not None else 1
        key = (eval_set.test_size, multiple)
        cached = self._eval_sizes.get(id(eval_set.dataset))
        if cached is not None and cached[0] == key:
            return cached[1]  # headers are read once per set, not at every val_dataloader() call
        ds = eval_set.dataset
        found, errors = resized_sizes(ds, range(len(ds)), eval_set.test_size, multiple)
        if errors:
            shown = "; ".join(f"{e.path} ({e.reason})" for e in list(errors.values())[:5])
            raise ImageReadError(
                eval_set.gt.image_dir,
                f"evaluation set {eval_set.name}: {len(errors)} of {len(ds)} "
                f"images unreadable; the protocol needs every one of them. e.g. {shown}",
            )
        sizes = [found[i] for i in range(len(ds))]
        self._eval_sizes[id(eval_set.dataset)] = (key, sizes)
        return sizes

    def eval_dataloader(self, eval_set: EvalSet) -> DataLoader:
        rank, world = (
            (torch.distributed.get_rank(), torch.distributed.get_world_size())
            if torch.distributed.is_available() and torch.distributed.is_initialized()
            else (0, 1)
        )
        sampler = SizeBucketBatchSampler(self.eval_sizes(eval_set), self.eval_batch_size, rank, world)
        return DataLoader(
            eval_set.dataset, batch_sampler=sampler, num_workers=self.num_workers, pin_memory=self.pin_memory
        )

    @property
    def classification_val_index(self) -> int | None:
        """Position of the classification hold-out among the validation dataloaders (after every evaluation
        set), or None without one (``val_fraction`` = 0, or an evaluation-only setup)."""
        return len(self.eval_sets) if self.val_set is not None and len(self.val_set) else None

    def val_dataloader(self) -> list[DataLoader]:
        loaders = [self.eval_dataloader(s) for s in self.eval_sets]
        if self.classification_val_index is not None:
            loaders.append(self.classification_val_dataloader())
        return loaders

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()


class RevisitedDataModule(RetrievalDataModule):
    """Evaluation only, on one set in the Revisited layout: ``<root>/gnd_<name>.pkl`` + ``<root>/jpg/``
    (``<root>/<name>/gnd_<name>.pkl`` is found too). Any dataset in that layout works (conf/data/revisited.yaml:
    ``data=revisited data.name=<name> data.root=<folder>``); nothing is trained.

    The config spells the set out as ``eval_sets.main`` (a :class:`~dalg.data.revisited.RevisitedSet` built from
    ``root``, ``name`` and ``set_name``, its test size from conf/data/eval/defaults.yaml). Without ``eval_sets``
    (in code) that one set is built here and needs ``test_size``.
    """

    def __init__(
        self,
        root: str,
        name: str,
        set_name: str | None = None,
        eval_sets: Mapping[str, EvalSetSpec | Mapping] | None = None,
        test_size: int | str | None = None,
        crop_queries: bool = True,
        monitor_set: str | None = None,
        **kwargs,
    ):
        if eval_sets is None:
            if test_size is None:
                raise ValueError(
                    f"RevisitedDataModule({name}): give test_size (a longer side, or 'original') or eval_sets"
                )
            main = RevisitedSet(
                data_dir=str(root),
                gnd_name=name,
                name=set_name or name,
                test_size=test_size,
                crop_queries=crop_queries,
            )
            eval_sets = {"main": main}
        super().__init__(
            root=None, eval_sets=eval_sets, monitor_set=monitor_set or set_name or name, **kwargs
        )
        self.dataset_root = root
        self.name = name
