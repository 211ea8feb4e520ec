"""Classification training sets (GLDv2 lists, folders of class subfolders) behind one interface.

A subclass lists ``{class name: [sample keys]}`` and says where a key's file is (``path_of``); this base class
relabels the classes 0..N-1 in sorted order, optionally drops classes with too few images, optionally pre-scans
the files, splits off a validation set that never takes a class's only image, and loads images so that a broken
file never crashes an epoch: it is replaced by another image of its class, and a class with no readable image left
is replaced by the next class's image (its own label stays unused) and reported by name.
"""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from dalg.data.failures import FailureLog, FailureSummary
from dalg.data.images import ImageReadError, fill_for, image_size, load_rgb, load_rgb_for_crop

log = logging.getLogger(__name__)

VERIFY_MODES = ("none", "exists", "header")


class UnreadableDataError(RuntimeError):
    """Too many training images are unreadable to go on (the share and the limit are in the message)."""


def class_sort_key(name: str) -> tuple[int, int | str]:
    """Numeric ids sort numerically ("10" after "9", as GLDv2 landmark ids); anything else as text, after them."""
    return (0, int(name)) if name.isdigit() else (1, name)


class SampleTable(Sequence):
    """``(key, label)`` pairs kept in two numpy arrays instead of millions of Python tuples and strings.

    GLDv2's 1.6M images cost ~30 MB this way. It also matters for DataLoader workers: forked workers share the
    parent's memory copy-on-write, and merely reading a Python object writes its reference count, so a list of
    tuples is copied page by page into every worker (pytorch/pytorch#13246); numpy buffers are not touched.
    """

    def __init__(self, keys: np.ndarray, labels: np.ndarray):
        self.keys = keys  # bytes (UTF-8), dtype S<n>
        self.labels = labels.astype(np.int32, copy=False)

    @classmethod
    def build(cls, pairs: Iterable[tuple[str, int]]) -> SampleTable:
        keys, labels = [], []
        for key, label in pairs:
            keys.append(key.encode("utf-8"))
            labels.append(label)
        return cls(np.array(keys, dtype=bytes) if keys else np.array([], "S1"), np.array(labels, np.int32))

    def key(self, index: int) -> str:
        return self.keys[index].decode("utf-8")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return SampleTable(self.keys[index], self.labels[index])
        return self.key(index), int(self.labels[index])

    def take(self, indices: Sequence[int]) -> SampleTable:
        idx = np.asarray(indices, dtype=np.int64)
        return SampleTable(self.keys[idx], self.labels[idx])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or len(other) != len(self):
            return False
        return all(a == tuple(b) for a, b in zip(self, other))

    __hash__ = None  # mutable-looking sequence: not hashable, like a list

    def __repr__(self) -> str:
        return f"SampleTable({len(self)} samples)"


def _check_file(path: Path, mode: str) -> str | None:
    """The reason ``path`` is unusable, or None; ``exists`` is a stat, ``header`` also parses the image header."""
    try:
        if mode == "exists":
            if not path.is_file():
                return "file does not exist"
            if path.stat().st_size == 0:
                return "empty file (0 bytes)"
            return None
        image_size(path)
        return None
    except ImageReadError as e:
        return e.reason
    except OSError as e:
        return f"{type(e).__name__}: {e}"


class LabelledImages(Dataset):
    """``(image, label)`` pairs; labels are 0..num_classes-1 in sorted class-name order.

    Args:
        groups: ``{class name: [sample keys]}``; a key is turned into a file by :meth:`path_of`.
        transform: applied to the decoded RGB PIL image.
        min_images_per_class: classes with fewer (listed, or readable when ``verify`` is on) images are left out.
        verify: ``none`` (default: broken files are found while training), ``exists`` (a stat per file) or
            ``header`` (parse each header) before training; unusable files are dropped and reported once,
            classes left empty are reported by name and get no label.
        source: what the list came from, for messages.
    """

    def __init__(
        self,
        groups: Mapping[str, Sequence[str]],
        transform: Callable | None = None,
        min_images_per_class: int = 1,
        verify: str = "none",
        source: str = "dataset",
        verify_threads: int = 16,
    ):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        if min_images_per_class < 1:
            raise ValueError(f"min_images_per_class must be >= 1, got {min_images_per_class}")
        self.source = source
        self.transform = transform
        self.failure_log = FailureLog()
        self.failures: dict[str, str] = {}  # path -> reason: this process's view until collect_failures()
        self.empty_classes: dict[str, str] = {}  # class name -> reason
        self.report_each = True  # warn per file (first few); the DataModule switches to one summary per epoch
        self.substitute_empty_classes = False  # DataModule: True, so a dead class never stops an epoch
        self._reported = (0, 0)
        self._dead_labels: set[int] = set()
        # set by the DataModule from data.*: decoding limits (dalg.data.images.load_rgb) and the unreadable share
        # above which loading stops (a wrong root would otherwise train a whole epoch on substitutes)
        self.max_pixels: int | None = None
        self.decode_side: float | None = None
        self.max_unreadable_fraction: float | None = None
        self.unreadable_check_after = 1000
        self._tried = self._unreadable = 0  # load attempts and failures in this process

        groups = {str(k): list(v) for k, v in groups.items()}
        self.n_listed = sum(len(v) for v in groups.values())
        if verify != "none":
            groups = self._prescan(groups, verify, verify_threads)
        kept = sorted((k for k, v in groups.items() if len(v) >= min_images_per_class), key=class_sort_key)
        if not kept:
            raise ValueError(f"{source}: no class has at least {min_images_per_class} images")
        self.label_map: dict[str, int] = {name: i for i, name in enumerate(kept)}
        self.samples = SampleTable.build((key, self.label_map[name]) for name in kept for key in groups[name])
        self._index_classes()

    # ----------------------------------------------------------------------------------------- layout
    def path_of(self, key: str) -> Path:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def path(self, index: int) -> Path:
        return self.path_of(self.samples.key(index))

    def _index_classes(self) -> None:
        self.class_names: list[str] = [""] * len(self.label_map)
        for name, label in self.label_map.items():
            self.class_names[label] = name
        labels = self.samples.labels
        order = np.argsort(labels, kind="stable")  # sample indices grouped by class, in sample order
        starts = np.searchsorted(labels[order], np.arange(len(self.class_names) + 1))
        self.class_index: list[np.ndarray] = [
            order[starts[c] : starts[c + 1]] for c in range(len(self.class_names))
        ]
        position = np.empty(len(labels), np.int64)  # rank of each sample within its class
        position[order] = np.arange(len(labels)) - starts[labels[order]]
        self._position = position

    @property
    def num_classes(self) -> int:
        return len(self.label_map)

    def __len__(self) -> int:
        return len(self.samples)

    # ------------------------------------------------------------------------------------ pre-scan
    def _prescan(self, groups: dict[str, list[str]], mode: str, threads: int) -> dict[str, list[str]]:
        flat = [(name, key) for name, keys in groups.items() for key in keys]
        with ThreadPoolExecutor(max(1, threads)) as pool:  # stat/header reads wait on the disk, not the CPU
            reasons = list(pool.map(lambda nk: _check_file(self.path_of(nk[1]), mode), flat, chunksize=256))
        kept: dict[str, list[str]] = {name: [] for name in groups}
        per_item, self.report_each = self.report_each, False  # one summary below, not also a warning per file
        for (name, key), reason in zip(flat, reasons):
            if reason is None:
                kept[name].append(key)
            else:
                self._record_image(str(self.path_of(key)), reason)
        for name, keys in kept.items():
            if not keys:
                self._record_class(name, f"all {len(groups[name])} listed image(s) unusable")
        self.report_each = per_item
        summary = self.collect_failures()
        if summary:
            log.warning(
                "%s (pre-scan '%s' of %d files): %s",
                self.source,
                mode,
                len(flat),
                summary.message(dropped=True),
            )
        return {name: keys for name, keys in kept.items() if keys}

    # -------------------------------------------------------------------------------------- loading
    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = int(self.samples.labels[index])
        img = (
            self._load_from_class(label, int(self._position[index]))
            if label not in self._dead_labels
            else None
        )
        if img is None:
            name = self.class_names[label]
            self._dead_labels.add(label)
            reason = f"none of its {len(self.class_index[label])} image(s) is readable"
            self._record_class(name, reason)
            if not self.substitute_empty_classes:
                raise ImageReadError(
                    self.path(index), f"no readable image left in class {label} (landmark {name}); {reason}"
                )
            img, label = self._substitute(label)
        return (self.transform(img) if self.transform else img), label

    def _load_from_class(self, label: int, start: int):
        """The image at ``start`` in its class, else the next readable one of the same class, else None."""
        members = self.class_index[label]
        for k in range(len(members)):
            path = self.path(int(members[(start + k) % len(members)]))
            if str(path) in self.failures:
                continue  # known broken in this process: do not pay for the failure twice
            self._tried += 1
            try:  # transparent areas: the model's mean
                crop_for = getattr(self.transform, "crop_for", None)
                if crop_for is not None:  # the random crop drawn first: a large JPEG decodes at reduced size
                    return load_rgb_for_crop(
                        path,
                        crop_for,
                        fill_for(self.transform),
                        self.max_pixels,
                        self.decode_side,
                        pixels=getattr(self.transform, "accepts_pixels", False),
                    )
                return load_rgb(
                    path, fill_for(self.transform), max_pixels=self.max_pixels, need_side=self.decode_side
                )
            except ImageReadError as e:
                self._unreadable += 1
                self._record_image(e.path, e.reason)
                self._check_unreadable_share()
        return None

    def _check_unreadable_share(self) -> None:
        limit = self.max_unreadable_fraction
        if (
            limit is None
            or self._tried < self.unreadable_check_after
            or self._unreadable <= limit * self._tried
        ):
            return
        shown = "; ".join(f"{p} ({r})" for p, r in list(self.failures.items())[:3])
        raise UnreadableDataError(
            f"{self.source}: {self._unreadable} of the {self._tried} images this loader process tried are unreadable "
            f"({self._unreadable / self._tried:.0%}), above data.max_unreadable_fraction={limit}; is data.root the "
            f"right folder? (data.verify=exists drops missing files before training; raise the limit to go on). "
            f"e.g. {shown}"
        )

    def _substitute(self, label: int):
        """An image of the next class (in label order) that still has a readable one, with that class's label."""
        for step in range(1, self.num_classes):
            other = (label + step) % self.num_classes
            if other in self._dead_labels or len(self.class_index[other]) == 0:
                continue  # known dead, or a class without samples in this split
            img = self._load_from_class(other, 0)
            if img is not None:
                return img, other
            self._dead_labels.add(other)
            self._record_class(
                self.class_names[other], f"none of its {len(self.class_index[other])} image(s) is readable"
            )
        raise ImageReadError(
            self.path(0).parent,
            f"{self.source}: not one readable image in any of the {self.num_classes} classes",
        )

    # ------------------------------------------------------------------------------------ reporting
    def _record_image(self, path: str, reason: str) -> None:
        new = path not in self.failures
        self.failures.setdefault(path, reason)
        self.failure_log.record_image(path, reason)
        if new and self.report_each and get_worker_info() is None and len(self.failures) <= 5:
            log.warning(
                "cannot read image %r: %s (replaced by another image of its class; %d unreadable so far)",
                path,
                reason,
                len(self.failures),
            )

    def _record_class(self, name: str, reason: str) -> None:
        new = name not in self.empty_classes
        self.empty_classes.setdefault(name, reason)
        self.failure_log.record_class(name, reason)
        if new and self.report_each and get_worker_info() is None:
            log.warning("%s: class %s has no readable image (%s)", self.source, name, reason)

    def collect_failures(self) -> FailureSummary:
        """Merge what every process recorded (main process + DataLoader workers); return what is new since the
        previous call. Call it from the main process."""
        images, classes = self.failure_log.read()
        for path, reason in images.items():
            self.failures.setdefault(path, reason)
        for name, reason in classes.items():
            self.empty_classes.setdefault(name, reason)
        seen_i, seen_c = self._reported
        new_images = dict(list(self.failures.items())[seen_i:])
        new_classes = dict(list(self.empty_classes.items())[seen_c:])
        self._reported = (len(self.failures), len(self.empty_classes))
        return FailureSummary(
            new_images, new_classes, len(self.failures), len(self.empty_classes), self.n_listed
        )

    def report_failures(self, logger: logging.Logger = log) -> FailureSummary:
        """One warning with the count and a few example paths for everything new since the last report."""
        summary = self.collect_failures()
        if summary:
            logger.warning("%s: %s", self.source, summary.message())
        return summary

    # ------------------------------------------------------------------------------------- splitting
    def split(self, val_fraction: float, seed: int = 0) -> tuple[LabelledImages, LabelledImages]:
        """``(train, val)`` sharing the label map; per class ``round(n * val_fraction)`` images go to val, but
        never the last one: a class with a single image stays wholly in train."""
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        rng = random.Random(seed)
        train_idx: list[int] = []
        val_idx: list[int] = []
        for members in self.class_index:
            members = members.tolist()
            rng.shuffle(members)
            k = min(len(members) - 1, round(len(members) * val_fraction))
            val_idx += members[:k]
            train_idx += members[k:]
        return self._subset(sorted(train_idx)), self._subset(sorted(val_idx))

    def _subset(self, indices: Sequence[int]) -> LabelledImages:
        part = copy.copy(self)  # shares the label map, transform and failure log
        part.samples = self.samples.take(indices)
        part.failures = self.failures
        part.empty_classes = self.empty_classes
        part._dead_labels = set()
        part._index_classes()
        return part
